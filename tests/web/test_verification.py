"""Comparing what the child wrote with what is stored."""

from __future__ import annotations

import hashlib

import asyncpg

from tests.web.conftest import StoredCommand, insert_event
from web.verification import EMPTY_SHA256, compare_streams, stored_figures


def _figures(data: bytes) -> dict[str, object]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_matching_streams_verify() -> None:
    """Equal byte counts and hashes on both streams match."""
    stored = {"stdout": (3, hashlib.sha256(b"abc").hexdigest())}
    document, matched = compare_streams(
        {"stdout": _figures(b"abc"), "stderr": _figures(b"")}, stored
    )
    assert matched is True
    assert document["stderr"]["stored"] == {"bytes": 0, "sha256": EMPTY_SHA256}


def test_a_differing_stream_fails() -> None:
    """One stream off makes the whole verification fail, and says which."""
    stored = {"stdout": (2, hashlib.sha256(b"ab").hexdigest())}
    document, matched = compare_streams({"stdout": _figures(b"abc")}, stored)
    assert matched is False
    assert document["stdout"]["matched"] is False
    assert document["stderr"]["matched"] is None


def test_nothing_expected_is_unknown() -> None:
    """Without figures from the runner (a lost command) the outcome is None."""
    _document, matched = compare_streams(None, {})
    assert matched is None


async def test_stored_figures_hash_in_sequence_order(
    pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """Postgres hashes each stream's chunks in sequence order, not insert order."""
    command_id = stored_command.command_id
    await insert_event(pool, command_id, 3, stream="stdout", data=b"world")
    await insert_event(pool, command_id, 1, stream="stdout", data=b"hello ")
    await insert_event(pool, command_id, 2, stream="stderr", data=b"\x00\xff")
    async with pool.acquire() as connection:
        figures = await stored_figures(connection, command_id)
    assert figures["stdout"] == (11, hashlib.sha256(b"hello world").hexdigest())
    assert figures["stderr"] == (2, hashlib.sha256(b"\x00\xff").hexdigest())
