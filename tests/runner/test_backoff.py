"""Reconnect and resend delays: exponential, capped, jittered (pure logic)."""

from __future__ import annotations

import pytest

from runner.backoff import Backoff, exponential_delay
from runner.connection import resend_delay


def test_delays_double_up_to_the_cap() -> None:
    """Without jitter the delays are 1, 2, 4, 8 and then the cap."""
    no_jitter = [
        exponential_delay(attempt, 1.0, 10.0, random_fraction=lambda: 1.0)
        for attempt in range(1, 7)
    ]
    assert no_jitter == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_jitter_stays_between_half_and_all_of_the_delay() -> None:
    """Equal jitter: never less than half the nominal delay, never more."""
    assert exponential_delay(3, 1.0, 10.0, random_fraction=lambda: 0.0) == 2.0
    for _ in range(200):
        assert 2.0 <= exponential_delay(3, 1.0, 10.0) <= 4.0


def test_backoff_resets_after_success() -> None:
    """A success starts the schedule over from the initial delay."""
    backoff = Backoff(initial=1.0, maximum=60.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_huge_attempt_numbers_stay_capped() -> None:
    """Thousands of failures in a row still give the capped delay, not an error."""
    assert exponential_delay(10_000, 0.5, 30.0, random_fraction=lambda: 1.0) == 30.0
    with pytest.raises(ValueError):
        exponential_delay(0, 1.0, 2.0)


def test_resend_waits_at_least_the_acknowledge_timeout() -> None:
    """The first resend waits the full timeout; later ones double, capped, jittered."""
    for _ in range(100):
        assert 5.0 <= resend_delay(1, 5.0, 60.0) <= 6.0
        assert 10.0 <= resend_delay(2, 5.0, 60.0) <= 12.0
        assert 60.0 <= resend_delay(9, 5.0, 60.0) <= 72.0
