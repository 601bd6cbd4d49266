"""Writing a command's delivery history straight into the tables.

The audit and retention tests build known histories with these, inserting
rows as the broker (events), the relay (deliveries, cursor) and the web tier
(the command's summary) would.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import asyncpg

from tests.broker.relay_harness import new_command

__all__ = [
    "BASE_TIME",
    "finish_command",
    "new_command",
    "record_delivery",
    "store_events",
]

BASE_TIME = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


async def store_events(
    pool: asyncpg.Pool,
    command_id: uuid.UUID,
    sequences: Iterable[int],
    stored_at: datetime = BASE_TIME,
    data: bytes = b"",
) -> None:
    """Insert output events as the broker would, all stored at ``stored_at``."""
    await pool.executemany(
        "INSERT INTO events (command_id, sequence, id, kind, stream, data, stored_at) "
        "VALUES ($1, $2, $3, 'output', 'stdout', $4, $5)",
        [(command_id, s, uuid.uuid4(), data, stored_at) for s in sequences],
    )


async def record_delivery(
    pool: asyncpg.Pool,
    command_id: uuid.UUID,
    first_sequence: int,
    last_sequence: int,
    delivered_at: datetime,
    *,
    late: bool = False,
) -> None:
    """Insert a deliveries row and advance the cursor, as the relay would."""
    event_count = await pool.fetchval(
        "SELECT count(*) FROM events WHERE command_id = $1 "
        "AND sequence BETWEEN $2 AND $3",
        command_id,
        first_sequence,
        last_sequence,
    )
    await pool.execute(
        "INSERT INTO deliveries (command_id, delivery_id, first_sequence, "
        "last_sequence, event_count, late, delivered_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7)",
        command_id,
        f"{command_id}:{first_sequence}-{last_sequence}",
        first_sequence,
        last_sequence,
        event_count,
        late,
        delivered_at,
    )
    await pool.execute(
        "UPDATE command_delivery SET delivered_through = "
        "greatest(delivered_through, $2), last_delivered_at = $3 "
        "WHERE command_id = $1",
        command_id,
        last_sequence,
        delivered_at,
    )


async def finish_command(
    pool: asyncpg.Pool,
    command_id: uuid.UUID,
    finished_at: datetime = BASE_TIME,
    *,
    status: str = "succeeded",
    verification_matched: bool | None = True,
) -> None:
    """Set the web tier's summary of a finished command."""
    await pool.execute(
        "UPDATE commands SET status = $2, exit_code = 0, finished_at = $3, "
        "verification_matched = $4 WHERE id = $1",
        command_id,
        status,
        finished_at,
        verification_matched,
    )
