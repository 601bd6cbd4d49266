"""Ranges of missing sequences: pure arithmetic, no I/O.

A gap is an inclusive range ``(first, last)`` of sequences that are not
stored. Gaps come from two places: the relay's ``gaps`` table (it waited,
recorded the gap and moved on) and holes a reader sees in the events table
(a sequence not stored, or not yet committed, below a stored one).
"""

from __future__ import annotations

from collections.abc import Iterable

Range = tuple[int, int]


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, non-overlapping ranges covering the same sequences."""
    merged: list[Range] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            previous_first, previous_last = merged[-1]
            merged[-1] = (previous_first, max(previous_last, last))
        else:
            merged.append((first, last))
    return merged


def subtract_present(gap: Range, present: Iterable[int]) -> list[Range]:
    """The parts of ``gap`` still missing once the sorted ``present`` are stored."""
    first, last = gap
    remaining: list[Range] = []
    cursor = first
    for sequence in present:
        if sequence < cursor or sequence > last:
            continue
        if sequence > cursor:
            remaining.append((cursor, sequence - 1))
        cursor = sequence + 1
    if cursor <= last:
        remaining.append((cursor, last))
    return remaining


def contiguous_run(after: int, sequences: Iterable[int]) -> int:
    """The last sequence of the unbroken run ``after + 1, after + 2, ...``.

    ``sequences`` must be ascending; the run stops at the first one missing.
    Returns ``after`` when ``after + 1`` is not among them.
    """
    through = after
    for sequence in sequences:
        if sequence != through + 1:
            break
        through = sequence
    return through


def describe(gap: Range) -> str:
    """A gap as people read it: ``missing 41-57`` or ``missing 41``."""
    first, last = gap
    return f"missing {first}" if first == last else f"missing {first}-{last}"
