"""Chunking output by size and by time window (pure logic)."""

from __future__ import annotations

import pytest

from core import wire
from runner.chunker import Chunker, base64_length, largest_chunk_for


def test_full_chunks_are_cut_at_the_size_limit() -> None:
    """Bytes beyond a multiple of the size wait; full chunks come out in order."""
    chunker = Chunker(chunk_bytes=4, window_seconds=1.0)
    assert chunker.add(b"abcdefghij", now=0.0) == [b"abcd", b"efgh"]
    assert chunker.pending_bytes == 2
    assert chunker.flush() == b"ij"
    assert chunker.flush() is None


def test_small_writes_wait_for_the_window() -> None:
    """Small writes are joined until the first one has waited the window."""
    chunker = Chunker(chunk_bytes=100, window_seconds=0.5)
    assert chunker.add(b"one ", now=10.0) == []
    assert chunker.add(b"two ", now=10.3) == []
    assert chunker.deadline == 10.5
    assert chunker.due(now=10.4) is None
    assert chunker.due(now=10.5) == b"one two "
    assert chunker.deadline is None


def test_window_restarts_with_the_next_write() -> None:
    """After a flush, the window counts from the next write, not the old one."""
    chunker = Chunker(chunk_bytes=100, window_seconds=0.5)
    chunker.add(b"a", now=0.0)
    chunker.flush()
    chunker.add(b"b", now=7.0)
    assert chunker.deadline == 7.5


def test_a_write_that_fills_chunks_exactly_leaves_nothing_waiting() -> None:
    """No deadline remains when the last chunk was exactly full."""
    chunker = Chunker(chunk_bytes=3, window_seconds=0.5)
    assert chunker.add(b"abcdef", now=0.0) == [b"abc", b"def"]
    assert chunker.deadline is None and chunker.pending_bytes == 0


def test_bytes_are_kept_exactly() -> None:
    """NUL, invalid UTF-8 and \\r come out as they went in."""
    awkward = b"\x00\xff\xfe\r\x1b[31m" * 1000
    chunker = Chunker(chunk_bytes=777, window_seconds=0.5)
    chunks = chunker.add(awkward, now=0.0)
    rest = chunker.flush()
    assert b"".join(chunks) + (rest or b"") == awkward


def test_chunks_fit_the_broker_limit_after_base64() -> None:
    """The chunk size leaves room for base64's 4/3 growth and the JSON around it."""
    limits = wire.Limits(
        max_frame_bytes=1024 * 1024, max_batch_events=100, max_event_bytes=100_000
    )
    size = largest_chunk_for(limits, configured=1024 * 1024)
    assert base64_length(size) + 1024 <= limits.max_event_bytes
    assert size > 70_000
    assert largest_chunk_for(limits, configured=4096) == 4096


def test_limits_without_room_for_data_are_an_error() -> None:
    """A broker whose limits leave no room for data is reported, not looped on."""
    limits = wire.Limits(max_frame_bytes=500, max_batch_events=1, max_event_bytes=500)
    with pytest.raises(ValueError, match="no room"):
        largest_chunk_for(limits, configured=1000)
