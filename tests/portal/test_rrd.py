"""Round-robin archives: fixed size, rates from counters, averages per slot, gaps stay gaps."""

from __future__ import annotations

import math

import pytest

from portal.rrd import TIERS, Archive

SOURCES = ("cpu_seconds", "memory_bytes")


def archive() -> Archive:
    return Archive(SOURCES, frozenset({"cpu_seconds"}))


def test_it_keeps_the_same_size_after_thirty_days_as_after_one_sample() -> None:
    series = archive()
    series.add(1_000_000.0, {"cpu_seconds": 0.0, "memory_bytes": 1.0})
    size_after_one = len(series.rings)
    for i in range(1, 30 * 24 * 360):  # every 10 s for 30 days
        series.add(1_000_000.0 + 10 * i, {"cpu_seconds": 0.5 * 10 * i, "memory_bytes": float(i % 7)})
    assert len(series.rings) == size_after_one == sum(n for _s, n in TIERS) * len(SOURCES) * 4


def test_it_turns_a_counter_into_a_rate_and_averages_a_gauge_per_slot() -> None:
    series = archive()
    start = 7_200_000.0  # a multiple of every tier's step
    for i in range(25):  # 250 s of samples every 10 s: CPU busy half the time
        series.add(start + 10 * i, {"cpu_seconds": 5.0 * i, "memory_bytes": 100.0 + i})
    hour = series.series("hour")
    assert hour["step"] == 10
    assert hour["values"]["cpu_seconds"][-1] == 0.5
    assert hour["values"]["memory_bytes"][-1] == 124.0
    assert hour["values"]["cpu_seconds"][-25] is None  # the first sample has no rate yet
    day = series.series("day")
    # The 240 s slot averaged its 24 samples of memory 100..123.
    assert day["values"]["memory_bytes"][-2] == sum(range(100, 124)) / 24
    assert day["times"][-1] - day["times"][-2] == 240


def test_it_leaves_unsampled_slots_empty_and_drops_a_counter_reset() -> None:
    series = archive()
    series.add(3600.0, {"cpu_seconds": 100.0, "memory_bytes": 1.0})
    series.add(3610.0, {"cpu_seconds": 110.0, "memory_bytes": 1.0})
    series.add(3650.0, {"cpu_seconds": 2.0, "memory_bytes": 2.0})  # restarted: counter went down
    hour = series.series("hour")["values"]
    assert hour["cpu_seconds"][-5] == 1.0
    assert hour["cpu_seconds"][-4:-1] == [None, None, None]
    assert hour["cpu_seconds"][-1] is None
    assert hour["memory_bytes"][-1] == 2.0


def test_it_survives_a_gap_longer_than_a_whole_ring() -> None:
    series = archive()
    series.add(0.0, {"cpu_seconds": 0.0, "memory_bytes": 7.0})
    series.add(10 * 1000.0, {"cpu_seconds": 0.0, "memory_bytes": 9.0})
    values = series.series("hour")["values"]["memory_bytes"]
    assert values[-1] == 9.0
    assert all(v is None for v in values[:-1])


def test_it_restores_from_its_stored_header_and_rings() -> None:
    series = archive()
    series.add(100.0, {"cpu_seconds": 1.0, "memory_bytes": 3.0})
    again = Archive(SOURCES, frozenset({"cpu_seconds"}), header=series.header, rings=bytearray(series.rings))
    again.add(110.0, {"cpu_seconds": 2.0, "memory_bytes": 3.0})
    assert again.series("hour")["values"]["cpu_seconds"][-1] == pytest.approx(0.1)  # float32
    assert not math.isnan(again.series("hour")["values"]["memory_bytes"][-1])
