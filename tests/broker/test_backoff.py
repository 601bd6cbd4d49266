"""Backoff schedule, Retry-After parsing and sink pauses, without any I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from broker.backoff import (
    SinkPause,
    backoff_delay,
    parse_retry_after,
    retry_delay,
)


def test_backoff_doubles_from_one_second_and_stops_at_ten() -> None:
    """Without jitter the delays are 1, 2, 4, 8, 10, 10 seconds."""
    delays = [
        backoff_delay(n, 1.0, 10.0, random_fraction=lambda: 0.0) for n in range(1, 7)
    ]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_jitter_only_adds_delay() -> None:
    """Jitter lies between nothing and a tenth of the nominal delay, never below."""
    for failures, nominal in [(1, 1.0), (3, 4.0), (9, 10.0)]:
        low = backoff_delay(failures, 1.0, 10.0, random_fraction=lambda: 0.0)
        high = backoff_delay(failures, 1.0, 10.0, random_fraction=lambda: 0.999)
        assert low == nominal
        assert nominal < high < nominal * 1.1


def test_backoff_survives_huge_failure_counts() -> None:
    """A command failing for days does not overflow the exponent."""
    assert backoff_delay(10_000, 1.0, 10.0, random_fraction=lambda: 0.0) == 10.0


def test_backoff_counts_failures_from_one() -> None:
    """Zero failures is a caller's mistake, named as such."""
    with pytest.raises(ValueError, match="counts from 1"):
        backoff_delay(0, 1.0, 10.0)


def test_retry_after_in_seconds() -> None:
    """Delay-seconds are read as they are; fractions are rounded up."""
    assert parse_retry_after("7", now=0.0) == 7.0
    assert parse_retry_after(" 0 ", now=0.0) == 0.0
    assert parse_retry_after("1.2", now=0.0) == 2.0


def test_retry_after_as_http_date() -> None:
    """An HTTP date means the seconds from when the answer arrived until then."""
    now = datetime(2026, 12, 4, 16, 0, 0, tzinfo=UTC).timestamp()
    later = format_datetime(datetime(2026, 12, 4, 16, 0, 30, tzinfo=UTC), usegmt=True)
    assert later == "Fri, 04 Dec 2026 16:00:30 GMT"
    assert parse_retry_after(later, now=now) == pytest.approx(30.0)


def test_retry_after_in_the_past_means_now() -> None:
    """A date already past asks for no wait at all, not a negative one."""
    now = datetime(2026, 12, 4, 16, 0, 0, tzinfo=UTC).timestamp()
    assert parse_retry_after("Fri, 04 Dec 2026 15:00:00 GMT", now=now) == 0.0


def test_unreadable_retry_after_is_ignored() -> None:
    """Garbage, negative numbers and a missing header all mean "not given"."""
    for value in [None, "", "soon", "-5", "nan", "inf"]:
        assert parse_retry_after(value, now=0.0) is None


def test_retry_after_is_never_shortened() -> None:
    """The wait is the longer of the backoff and what the sink asked for."""
    assert retry_delay(1, 1.0, 10.0, 30.0, random_fraction=lambda: 0.0) == 30.0
    assert retry_delay(4, 1.0, 10.0, 2.0, random_fraction=lambda: 0.0) == 8.0
    assert retry_delay(2, 1.0, 10.0, None, random_fraction=lambda: 0.0) == 2.0


def test_sink_pause_only_grows() -> None:
    """A shorter pause asked during a longer one does not end it early."""
    pause = SinkPause()
    assert pause.remaining(now=100.0) == 0.0
    pause.pause(now=100.0, seconds=10.0)
    pause.pause(now=101.0, seconds=2.0)
    assert pause.remaining(now=105.0) == pytest.approx(5.0)
    assert pause.remaining(now=111.0) == 0.0
