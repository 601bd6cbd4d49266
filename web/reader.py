"""Reading a command's log from the events table, by cursor, never skipping.

A page holds only the unbroken run of sequences after the cursor. A
sequence that is missing, or whose transaction has not committed yet, ends
the page there, so a reader that follows ``next_after`` sees every sequence
exactly once and in order, whatever the writers do concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import asyncpg

from core.tables import FINAL_STATUSES
from web.gaps import Range, contiguous_run, describe, merge_ranges, subtract_present
from web.notifier import EventNotifier
from web.queries import web_queries as queries
from web.schemas import EventOut, EventsPage, GapOut

# While a long poll waits, the database is re-read at least this often, so a
# lost notification or a gap recorded by the relay is seen without one.
RECHECK_SECONDS = 1.0

# Recorded gaps listed in one page at most (the nearest after the cursor).
GAPS_LISTED = 100


class UnknownCommandError(LookupError):
    """The command id names no command."""


async def read_page(
    connection: asyncpg.Connection, command_id: uuid.UUID, after: int, limit: int
) -> EventsPage:
    """One page of the log after ``after``; raises UnknownCommandError."""
    status: str | None = await connection.fetchval(queries.command_state, command_id)
    if status is None:
        raise UnknownCommandError(str(command_id))

    rows = await connection.fetch(queries.events_after, command_id, after, limit)
    through = contiguous_run(after, (row["sequence"] for row in rows))
    events = [_event_out(row) for row in rows if row["sequence"] <= through]

    highest = await connection.fetchrow(queries.highest_event, command_id)
    highest_stored = highest["sequence"] if highest is not None else 0
    finished = highest is not None and highest["kind"] == "exit"

    # The hole the page stopped at, if a later sequence is already stored.
    cut_by_limit = len(rows) == limit and through == rows[-1]["sequence"]
    waiting_for: int | None = None
    hole: Range | None = None
    if not cut_by_limit and highest_stored > through:
        waiting_for = through + 1
        next_stored: int = await connection.fetchval(
            queries.next_stored_after, command_id, through
        )
        hole = (through + 1, next_stored - 1)

    gaps = await known_gaps(connection, command_id, after, hole)
    return EventsPage(
        command_id=command_id,
        after=after,
        events=events,
        next_after=through,
        contiguous_through=through,
        highest_stored=highest_stored,
        more=cut_by_limit,
        waiting_for=waiting_for,
        gaps=gaps,
        finished=finished,
        status=status,
    )


async def known_gaps(
    connection: asyncpg.Connection,
    command_id: uuid.UUID,
    after: int,
    hole: Range | None,
) -> list[GapOut]:
    """Recorded gaps still missing after ``after``, plus the hole a reader waits at.

    At most ``GAPS_LISTED`` recorded gaps are listed, nearest first.
    """
    rows = await connection.fetch(queries.recorded_gaps, command_id, after, GAPS_LISTED)
    # Late events may have filled parts of recorded gaps since.
    present = [
        row["sequence"]
        for row in await connection.fetch(
            queries.stored_in_recorded_gaps, command_id, after
        )
    ]
    recorded: list[Range] = []
    for row in rows:
        recorded.extend(
            subtract_present((row["first_missing"], row["last_missing"]), present)
        )
    recorded = merge_ranges(recorded)

    gaps = [
        GapOut(first, last, True, describe((first, last))) for first, last in recorded
    ]
    if hole is not None and not any(
        first <= hole[0] and hole[1] <= last for first, last in recorded
    ):
        gaps.append(GapOut(hole[0], hole[1], False, describe(hole)))
        gaps.sort(key=lambda gap: gap.first)
    return gaps


async def read_page_waiting(
    pool: asyncpg.Pool,
    notifier: EventNotifier,
    command_id: uuid.UUID,
    after: int,
    limit: int,
    wait_seconds: float,
) -> EventsPage:
    """Like :func:`read_page`, but hold on up to ``wait_seconds`` for news.

    Returns at once when the page has events or the reader waits at a hole it
    can pass (recorded by the relay, or left when the command ended);
    otherwise as soon as anything the reader can see changes (a new highest
    sequence, a gap, the end), or when the wait is over.
    """
    deadline = time.monotonic() + wait_seconds
    with notifier.subscribe(str(command_id)) as woken:
        async with pool.acquire() as connection:
            page = await read_page(connection, command_id, after, limit)
        baseline = _news_marker(page)

        while not page.events and not _reader_can_move(page) and not notifier.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), min(remaining, RECHECK_SECONDS))
            woken.clear()
            async with pool.acquire() as connection:
                page = await read_page(connection, command_id, after, limit)
            if _news_marker(page) != baseline:
                break
    return page


def _reader_can_move(page: EventsPage) -> bool:
    # A hole the relay gave up on, or one left when the command ended, is
    # something the reader can act on now (show it and move past it).
    return any(
        gap.first == page.next_after + 1 and (gap.recorded or page.finished)
        for gap in page.gaps
    )


def _news_marker(page: EventsPage) -> tuple[object, ...]:
    return (
        page.highest_stored,
        page.finished,
        page.status in FINAL_STATUSES,
        tuple((gap.first, gap.last, gap.recorded) for gap in page.gaps),
    )


def _event_out(row: asyncpg.Record) -> EventOut:
    data = bytes(row["data"])
    return EventOut(
        sequence=row["sequence"],
        id=row["id"],
        kind=row["kind"],
        stream=row["stream"],
        data=data,
        text=data.decode("utf-8", errors="replace"),
        payload=json_object(row["payload"]),
        emitted_at=row["emitted_at"],
        stored_at=row["stored_at"],
    )


def json_object(value: str | None) -> dict[str, Any] | None:
    """A jsonb column as a dict (asyncpg hands jsonb over as text)."""
    if value is None:
        return None
    loaded = json.loads(value)
    return loaded if isinstance(loaded, dict) else {"value": loaded}
