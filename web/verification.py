"""End-to-end verification: what the child wrote against what is stored.

The exit event carries, per stream, the byte count and SHA-256 of what the
child wrote. The stored figures are computed in Postgres over the output
events in sequence order. Equal figures prove the log is byte-exact.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

from core.wire import STREAMS
from web.queries import web_queries as queries

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def compare_streams(
    expected_streams: Mapping[str, Any] | None,
    stored_streams: Mapping[str, tuple[int, str]],
) -> tuple[dict[str, dict[str, Any]], bool | None]:
    """The verification document and whether every stream matched.

    ``expected_streams`` is the exit payload's ``streams`` object (or None when
    the runner could not say, e.g. a lost command); ``stored_streams`` maps a
    stream to its stored (bytes, sha256). Matched is None when nothing was
    expected.
    """
    document: dict[str, dict[str, Any]] = {}
    verdicts: list[bool] = []
    for stream in STREAMS:
        stored_bytes, stored_sha256 = stored_streams.get(stream, (0, EMPTY_SHA256))
        stored = {"bytes": stored_bytes, "sha256": stored_sha256}
        figures = (expected_streams or {}).get(stream)
        expected: dict[str, Any] | None = None
        matched: bool | None = None
        if isinstance(figures, Mapping) and "bytes" in figures and "sha256" in figures:
            expected = {
                "bytes": int(figures["bytes"]),
                "sha256": str(figures["sha256"]),
            }
            matched = (
                expected["bytes"] == stored_bytes
                and expected["sha256"].lower() == stored_sha256
            )
            verdicts.append(matched)
        document[stream] = {"expected": expected, "stored": stored, "matched": matched}

    overall = all(verdicts) if verdicts else None
    return document, overall


async def stored_figures(
    connection: asyncpg.Connection, command_id: uuid.UUID
) -> dict[str, tuple[int, str]]:
    """Per stream, (bytes, sha256 hex) of the stored output in sequence order."""
    try:
        async with connection.transaction():
            rows = await connection.fetch(queries.stored_stream_digests, command_id)
    except asyncpg.ProgramLimitExceededError:
        # A stream over Postgres's 1 GiB value limit cannot be aggregated;
        # hash it here instead, one event at a time.
        return await _stored_figures_streaming(connection, command_id)
    return {row["stream"]: (int(row["bytes"]), row["sha256"]) for row in rows}


async def _stored_figures_streaming(
    connection: asyncpg.Connection, command_id: uuid.UUID
) -> dict[str, tuple[int, str]]:
    figures: dict[str, tuple[int, str]] = {}
    for stream in STREAMS:
        digest = hashlib.sha256()
        size = 0
        async with connection.transaction():
            async for row in connection.cursor(
                queries.stream_output, command_id, stream
            ):
                digest.update(row["data"])
                size += len(row["data"])
        if size:
            figures[stream] = (size, digest.hexdigest())
    return figures


async def verify_command(
    connection: asyncpg.Connection, command_id: uuid.UUID
) -> bool | None:
    """Compute and store the verification of a command whose exit is stored.

    Returns whether it matched (None when the exit payload had no figures,
    or no exit event is stored yet).
    """
    payload_text = await connection.fetchval(queries.exit_payload, command_id)
    if payload_text is None:
        return None
    payload = json.loads(payload_text)
    expected = payload.get("streams") if isinstance(payload, dict) else None

    stored = await stored_figures(connection, command_id)
    document, matched = compare_streams(expected, stored)
    await connection.execute(
        queries.store_verification, command_id, json.dumps(document), matched
    )
    return matched
