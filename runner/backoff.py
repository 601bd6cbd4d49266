"""Delay schedules for reconnecting and resending: exponential, capped, jittered.

Pure logic. Jitter spreads many runners that lost the same broker, so they do
not all come back in the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def exponential_delay(
    attempt: int,
    initial: float,
    maximum: float,
    random_fraction: Callable[[], float] = random.random,
) -> float:
    """The delay before try number ``attempt`` (1-based), with equal jitter.

    The nominal delay is ``initial * 2 ** (attempt - 1)`` capped at ``maximum``;
    the result lies between half of it and all of it.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    nominal = min(maximum, initial * 2 ** min(attempt - 1, 32))
    return nominal / 2 + random_fraction() * nominal / 2


class Backoff:
    """Counts failures in a row and says how long to wait before the next try."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0

    def next_delay(self) -> float:
        """Record one more failure and return the delay before retrying."""
        self.failures += 1
        return exponential_delay(self.failures, self.initial, self.maximum)

    def reset(self) -> None:
        """Forget past failures after a success."""
        self.failures = 0
