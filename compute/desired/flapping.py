"""The flap breaker: stop auto-correcting a resource that something keeps changing back.

When autocorrect puts a resource back and someone (a person, a script, another controller) changes it
again, correcting forever would fight them and churn the workload. The reconciler records a timestamp per
correction of a resource and asks :class:`FlapBreaker` before each new one: after ``max_corrections``
within ``window_seconds`` the resource is marked Flapping and left alone until the window has passed
without enough corrections to trip again. The decision is pure: the caller owns the clock and the storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

Timestamp = float | datetime


def _seconds(moment: Timestamp) -> float:
    return moment.timestamp() if isinstance(moment, datetime) else float(moment)


@dataclass(frozen=True)
class FlapDecision:
    """Whether to correct now; when not, the resource is flapping until ``retry_at`` (epoch seconds)."""

    correct: bool
    flapping: bool
    corrections_in_window: int
    retry_at: float | None = None


class FlapBreaker:
    """Allow at most ``max_corrections`` corrections of one resource per sliding ``window_seconds``."""

    def __init__(self, max_corrections: int, window_seconds: int) -> None:
        if max_corrections < 1:
            raise ValueError("max_corrections must be at least 1")
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self.max_corrections = max_corrections
        self.window_seconds = window_seconds

    def recent(self, corrections: Iterable[Timestamp], now: Timestamp) -> list[float]:
        """The corrections still inside the window ending at ``now``, oldest first (what to keep stored).

        Timestamps after ``now`` (another node's clock running ahead) count as recent: dropping them
        would let a skewed clock bypass the breaker.
        """
        start = _seconds(now) - self.window_seconds
        return sorted(moment for moment in map(_seconds, corrections) if moment > start)

    def decide(self, corrections: Iterable[Timestamp], now: Timestamp) -> FlapDecision:
        """Decide from the past correction times of a resource whether to correct it again now."""
        recent = self.recent(corrections, now)
        if len(recent) < self.max_corrections:
            return FlapDecision(correct=True, flapping=False, corrections_in_window=len(recent))
        # Correcting is allowed again once enough of the recent corrections have left the window that
        # fewer than max_corrections remain: the (len - max + 1)-th oldest must expire.
        retry_at = recent[len(recent) - self.max_corrections] + self.window_seconds
        return FlapDecision(
            correct=False, flapping=True, corrections_in_window=len(recent), retry_at=retry_at
        )
