"""Range arithmetic for missing sequences."""

from __future__ import annotations

from web.gaps import contiguous_run, describe, merge_ranges, subtract_present


def test_contiguous_run_stops_at_first_missing() -> None:
    """The run after the cursor ends before the first missing sequence."""
    assert contiguous_run(4, [5, 6, 8, 9]) == 6
    assert contiguous_run(4, [6, 7]) == 4
    assert contiguous_run(0, []) == 0


def test_merge_ranges_joins_overlapping_and_adjacent() -> None:
    """Overlapping and touching ranges become one, in order."""
    assert merge_ranges([(10, 12), (1, 3), (4, 5), (11, 20)]) == [(1, 5), (10, 20)]


def test_subtract_present_splits_a_gap() -> None:
    """Late events inside a gap split it into what is still missing."""
    assert subtract_present((41, 57), [50]) == [(41, 49), (51, 57)]
    assert subtract_present((41, 43), [41, 42, 43]) == []
    assert subtract_present((41, 43), [1, 99]) == [(41, 43)]


def test_describe_reads_like_people_write() -> None:
    """A gap reads ``missing 41-57``, a single sequence ``missing 41``."""
    assert describe((41, 57)) == "missing 41-57"
    assert describe((41, 41)) == "missing 41"
