"""Round-robin archives: a bounded, downsampled history of a few figures per object, as RRDtool keeps them.

A series keeps one ring of slots per tier (10 s for an hour, 4 min for a day, 30 min for a week, 2 h for
30 days); every sample is averaged into the current slot of each tier, so the stored size of a series is
fixed however long it runs. Counters (CPU seconds, bytes) are turned into per-second rates against the
previous raw sample before they are averaged, gauges (memory) are averaged as they are. Pure logic: the
caller keeps `Archive.header` (JSON) and `Archive.rings` (bytes) where it likes.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

# (step seconds, slots): an hour, a day, a week, 30 days.
TIERS: tuple[tuple[int, int], ...] = ((10, 360), (240, 360), (1800, 336), (7200, 360))
RANGES = {"hour": 0, "day": 1, "week": 2, "month": 3}
# Where each tier's rings begin, in slots per source.
_TIER_STARTS = tuple(sum(slots for _step, slots in TIERS[:tier]) for tier in range(len(TIERS)))
FORMAT_VERSION = 1


@dataclass
class Archive:
    """One series: named sources, each a gauge or a counter, and a float32 ring per tier and source."""

    sources: tuple[str, ...]
    counters: frozenset[str]
    header: dict[str, Any] = field(default_factory=dict)
    rings: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        expected = self._ring_bytes()
        if self.header.get("version") != FORMAT_VERSION or self.header.get("sources") != list(self.sources):
            # A new series, or one whose layout changed: start empty rather than misread old bytes.
            self.header = {
                "version": FORMAT_VERSION,
                "sources": list(self.sources),
                "tiers": [{"slot": None, "sum": [0.0] * len(self.sources), "count": [0] * len(self.sources)}
                          for _ in TIERS],
                "raw": None,
                "raw_time": None,
            }  # fmt: skip
            self.rings = bytearray(array("f", [math.nan]) * (expected // 4))
        elif len(self.rings) != expected:
            self.rings = bytearray(array("f", [math.nan]) * (expected // 4))

    def _ring_bytes(self) -> int:
        return sum(slots for _step, slots in TIERS) * len(self.sources) * 4

    def _offset(self, tier: int, source: int, slot: int) -> int:
        """Index of a slot in the float32 view of `rings`."""
        slots = TIERS[tier][1]
        return _TIER_STARTS[tier] * len(self.sources) + source * slots + slot % slots

    def add(self, timestamp: float, raw: dict[str, float | None]) -> None:
        """Record one sample taken at `timestamp` (seconds): counters as running totals, gauges as is."""
        previous, previous_time = self.header["raw"], self.header["raw_time"]
        values: list[float | None] = []
        for name in self.sources:
            value = raw.get(name)
            if name in self.counters:
                before = previous.get(name) if previous else None
                elapsed = timestamp - previous_time if previous_time is not None else 0
                # A counter that went down was reset (a restart): no rate for this interval.
                if value is None or before is None or elapsed <= 0 or value < before:
                    values.append(None)
                else:
                    values.append((value - before) / elapsed)
            else:
                values.append(value)
        self.header["raw"] = {name: raw.get(name) for name in self.counters}
        self.header["raw_time"] = timestamp
        view: Any = memoryview(self.rings).cast("f")
        for tier, (step, slots) in enumerate(TIERS):
            state = self.header["tiers"][tier]
            slot = int(timestamp // step)
            if state["slot"] is not None and slot != state["slot"]:
                self._close_slot(view, tier, state)
                # Slots skipped while nothing was sampled are unknown, not the last value.
                gap = min(slot - state["slot"] - 1, slots)
                for missing in range(state["slot"] + 1, state["slot"] + 1 + max(gap, 0)):
                    for source in range(len(self.sources)):
                        view[self._offset(tier, source, missing)] = math.nan
            if state["slot"] != slot:
                state["slot"] = slot
                state["sum"] = [0.0] * len(self.sources)
                state["count"] = [0] * len(self.sources)
            for source, value in enumerate(values):
                if value is not None and math.isfinite(value):
                    state["sum"][source] += value
                    state["count"][source] += 1
            self._close_slot(view, tier, state)  # the current slot shows its average so far

    def _close_slot(self, view: Any, tier: int, state: dict[str, Any]) -> None:
        for source in range(len(self.sources)):
            count = state["count"][source]
            view[self._offset(tier, source, state["slot"])] = (
                state["sum"][source] / count if count else math.nan
            )

    def series(self, range_name: str) -> dict[str, Any]:
        """The tier of `range_name`: slot start times (oldest first), a list per source (None: no data)."""
        tier = RANGES[range_name]
        step, slots = TIERS[tier]
        last = self.header["tiers"][tier]["slot"]
        if last is None:
            return {"step": step, "times": [], "values": {name: [] for name in self.sources}}
        first = last - slots + 1
        view = memoryview(self.rings).cast("f")
        values: dict[str, list[float | None]] = {}
        for source, name in enumerate(self.sources):
            column = [view[self._offset(tier, source, slot)] for slot in range(first, last + 1)]
            values[name] = [None if math.isnan(v) else float(v) for v in column]
        return {"step": step, "times": [slot * step for slot in range(first, last + 1)], "values": values}
