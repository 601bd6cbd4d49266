"""When the relay tries a failed delivery again: backoff, Retry-After, sink pauses.

Pure logic, no I/O: clocks and randomness are passed in, so every rule here is
tested without a sink.

- A failed delivery waits ``base * 2 ** (failures - 1)`` seconds, capped at
  ``cap`` (1, 2, 4, 8, 10, 10, ... with the defaults), plus jitter that only
  ever adds delay, so many commands failing together spread out.
- A sink's ``Retry-After`` (delay-seconds or an HTTP date, RFC 9110 10.2.3) is
  honoured and never shortened: the wait is the longer of the two.
- A 429 or 503 pauses the whole sink, so every worker bound for it waits, not
  only the one that was told.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from datetime import UTC
from email.utils import parsedate_to_datetime

JITTER_FRACTION = 0.1

# Statuses that mean "the sink is overloaded": slow down every worker.
THROTTLING_STATUSES = frozenset({429, 503})


def backoff_delay(
    failures: int,
    base: float,
    cap: float,
    random_fraction: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after ``failures`` failures in a row (counted from 1).

    The nominal delay doubles from ``base`` and stops at ``cap``; jitter adds up
    to a tenth of it on top, never less. Raises ValueError for ``failures < 1``.
    """
    if failures < 1:
        raise ValueError("failures counts from 1")
    nominal = min(cap, base * 2 ** min(failures - 1, 32))
    return nominal + random_fraction() * nominal * JITTER_FRACTION


def parse_retry_after(value: str | None, now: float) -> float | None:
    """The seconds a ``Retry-After`` header asks for, or None if absent or invalid.

    ``now`` is the Unix time the response arrived, used for the HTTP-date form;
    a date in the past means zero. Delay-seconds must be a non-negative integer
    (fractions are accepted and rounded up, as some sinks send them).
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None

    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds) and seconds >= 0:
            return float(math.ceil(seconds))
        return None

    try:
        date = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if date.tzinfo is None:
        # RFC 9110 dates are always GMT; a naive result means "GMT" was implied.
        date = date.replace(tzinfo=UTC)
    return max(0.0, date.timestamp() - now)


def retry_delay(
    failures: int,
    base: float,
    cap: float,
    retry_after: float | None,
    random_fraction: Callable[[], float] = random.random,
) -> float:
    """Seconds before the next try: the backoff, or longer if the sink asked."""
    delay = backoff_delay(failures, base, cap, random_fraction)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


class SinkPause:
    """Until when a sink asked everyone to hold off; shared by all workers.

    Times are on a monotonic clock supplied by the caller. A pause only ever
    grows: a shorter request arriving during a longer pause changes nothing.
    """

    def __init__(self) -> None:
        self.paused_until = 0.0

    def pause(self, now: float, seconds: float) -> None:
        """Hold every request to this sink for ``seconds`` from ``now``."""
        self.paused_until = max(self.paused_until, now + seconds)

    def remaining(self, now: float) -> float:
        """Seconds left before requests may go to the sink again (0 if none)."""
        return max(0.0, self.paused_until - now)
