"""The flap breaker stops correcting a resource that keeps being changed back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from compute.desired.flapping import FlapBreaker, FlapDecision


def test_it_corrects_while_below_the_limit() -> None:
    breaker = FlapBreaker(max_corrections=3, window_seconds=600)
    assert breaker.decide([], now=1000) == FlapDecision(correct=True, flapping=False, corrections_in_window=0)
    assert breaker.decide([900, 950], now=1000).correct


def test_it_trips_after_the_limit_within_the_window() -> None:
    decision = FlapBreaker(max_corrections=3, window_seconds=600).decide([500, 700, 900], now=1000)
    assert (decision.correct, decision.flapping, decision.corrections_in_window) == (False, True, 3)
    assert decision.retry_at == 1100  # when the correction at 500 leaves the window


def test_it_ignores_corrections_older_than_the_window() -> None:
    assert FlapBreaker(max_corrections=3, window_seconds=600).decide([100, 300, 700, 900], now=1000).correct


def test_it_resets_once_the_window_has_passed_quietly() -> None:
    breaker = FlapBreaker(max_corrections=2, window_seconds=60)
    history = [0.0, 10.0]
    assert breaker.decide(history, now=30).flapping
    assert breaker.decide(history, now=59.9).flapping
    assert breaker.decide(history, now=60.0).correct


def test_it_waits_for_enough_corrections_to_expire_when_far_over_the_limit() -> None:
    decision = FlapBreaker(max_corrections=2, window_seconds=100).decide([10, 20, 30, 40, 50], now=60)
    assert decision.retry_at == 140  # only then do fewer than 2 remain (the one at 50)


def test_it_counts_corrections_from_a_clock_running_ahead() -> None:
    assert FlapBreaker(max_corrections=1, window_seconds=60).decide([1_000_000], now=10).flapping


def test_it_accepts_datetimes() -> None:
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    history = [now - timedelta(seconds=s) for s in (10, 20, 30)]
    breaker = FlapBreaker(max_corrections=3, window_seconds=60)
    assert breaker.decide(history, now=now).flapping
    assert breaker.recent(history, now=now + timedelta(seconds=45)) == [
        (now - timedelta(seconds=10)).timestamp()
    ]


def test_it_refuses_a_breaker_that_could_never_correct() -> None:
    with pytest.raises(ValueError):
        FlapBreaker(max_corrections=0, window_seconds=60)
    with pytest.raises(ValueError):
        FlapBreaker(max_corrections=1, window_seconds=0)
