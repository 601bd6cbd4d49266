"""The read API's paging: gap-aware, never skipping, long polls that wake."""

from __future__ import annotations

import asyncio
import base64
import random
import time
import uuid

import asyncpg
import httpx

from tests.web.conftest import StoredCommand, insert_event, store_run
from web.reader import read_page


async def _page(
    client: httpx.AsyncClient, command_id: uuid.UUID, **params: object
) -> dict:
    response = await client.get(f"/api/commands/{command_id}/events", params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def test_pages_in_sequence_order_with_cursor(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """Pages of 7 follow next_after and return every sequence once, in order."""
    last = await store_run(
        pool,
        stored_command.command_id,
        [("stdout" if n % 3 else "stderr", f"line {n}\n".encode()) for n in range(40)],
    )

    seen: list[int] = []
    after = 0
    while True:
        page = await _page(client, stored_command.command_id, after=after, limit=7)
        assert len(page["events"]) <= 7
        seen.extend(event["sequence"] for event in page["events"])
        after = page["next_after"]
        if page["finished"] and after == page["highest_stored"]:
            break

    assert seen == list(range(1, last + 1))
    assert page["gaps"] == []
    assert page["status"] == "queued"  # the summary moves with deliveries, not reads


async def test_paging_while_writers_append_sees_every_sequence_once(
    client: httpx.AsyncClient, database_url: str, stored_command: StoredCommand
) -> None:
    """Three writers committing out of order; a paging reader gets 1..N exactly once."""
    total = 300
    command_id = stored_command.command_id

    async def writer(remainder: int) -> None:
        connection = await asyncpg.connect(database_url)
        try:
            for sequence in range(1, total + 1):
                if sequence % 3 != remainder:
                    continue
                async with connection.transaction():
                    await insert_event(
                        connection, command_id, sequence, data=f"{sequence}\n".encode()
                    )
                    # Hold some transactions open so commits land out of order.
                    if random.random() < 0.3:
                        await asyncio.sleep(random.random() * 0.02)
        finally:
            await connection.close()

    writers = [asyncio.create_task(writer(remainder)) for remainder in range(3)]
    seen: list[int] = []
    after = 0
    deadline = time.monotonic() + 120
    while after < total and time.monotonic() < deadline:
        page = await _page(client, command_id, after=after, limit=7, wait=2)
        for event in page["events"]:
            seen.append(event["sequence"])
            assert base64.b64decode(event["data"]) == f"{event['sequence']}\n".encode()
        assert page["contiguous_through"] == page["next_after"]
        after = page["next_after"]
    await asyncio.gather(*writers)

    assert seen == list(range(1, total + 1))


async def test_open_transaction_at_k_does_not_make_a_reader_skip_it(
    client: httpx.AsyncClient,
    database_url: str,
    pool: asyncpg.Pool,
    stored_command: StoredCommand,
) -> None:
    """Sequence k in an open transaction while k+1 commits: the page stops before k."""
    command_id = stored_command.command_id
    for sequence in range(1, 5):
        await insert_event(pool, command_id, sequence, data=b"x")

    holder = await asyncpg.connect(database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await insert_event(holder, command_id, 5, data=b"five", notify=False)
        await insert_event(pool, command_id, 6, data=b"six")

        page = await _page(client, command_id, after=0, limit=100)
        assert [event["sequence"] for event in page["events"]] == [1, 2, 3, 4]
        assert page["next_after"] == 4
        assert page["highest_stored"] == 6
        assert page["waiting_for"] == 5
        assert page["gaps"] == [
            {"first": 5, "last": 5, "recorded": False, "label": "missing 5"}
        ]

        # A long poll parked at 4 returns as soon as 5 commits.
        waiting = asyncio.create_task(_page(client, command_id, after=4, wait=10))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await holder.execute(
            "SELECT pg_notify('runledger_events', $1)", str(command_id)
        )
        await transaction.commit()
        page = await asyncio.wait_for(waiting, 8)
    finally:
        await holder.close()

    assert [event["sequence"] for event in page["events"]] == [5, 6]
    assert base64.b64decode(page["events"][0]["data"]) == b"five"
    assert page["gaps"] == []


async def test_long_poll_returns_when_an_event_is_stored(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """A read with wait= holds on until the next event is committed, then returns it."""
    command_id = stored_command.command_id
    started = time.monotonic()
    waiting = asyncio.create_task(_page(client, command_id, after=0, wait=10))
    await asyncio.sleep(0.5)
    assert not waiting.done()

    await insert_event(pool, command_id, 1, data=b"hello")
    page = await asyncio.wait_for(waiting, 8)

    assert [event["sequence"] for event in page["events"]] == [1]
    assert time.monotonic() - started < 9


async def test_long_poll_without_news_returns_after_the_wait(
    client: httpx.AsyncClient, stored_command: StoredCommand
) -> None:
    """With nothing stored, a long poll ends empty once its wait is over."""
    started = time.monotonic()
    page = await _page(client, stored_command.command_id, after=0, wait=1.5)
    assert page["events"] == []
    assert page["highest_stored"] == 0
    assert time.monotonic() - started >= 1.2


async def test_recorded_gap_is_reported_and_late_events_shrink_it(
    pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """A gap the relay recorded is listed, minus late events that filled it since."""
    command_id = stored_command.command_id
    for sequence in [*range(1, 41), *range(58, 61)]:
        await insert_event(pool, command_id, sequence, data=b".")
    await pool.execute(
        "INSERT INTO gaps (command_id, first_missing, last_missing, skipped_at)"
        " VALUES ($1, 41, 57, now())",
        command_id,
    )

    async with pool.acquire() as connection:
        page = await read_page(connection, command_id, 0, 1000)
        assert page.next_after == 40
        assert [(gap.first, gap.last, gap.recorded) for gap in page.gaps] == [
            (41, 57, True)
        ]
        assert page.gaps[0].label == "missing 41-57"

        await insert_event(pool, command_id, 50, data=b"late")
        page = await read_page(connection, command_id, 40, 1000)
        assert [gap.label for gap in page.gaps] == ["missing 41-49", "missing 51-57"]

        # Past the gap, a reader is not told about it again.
        page = await read_page(connection, command_id, 57, 1000)

    assert [event.sequence for event in page.events] == [58, 59, 60]
    assert page.gaps == []


async def test_long_poll_at_a_recorded_gap_returns_at_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """A reader parked at a gap the relay recorded is told at once, not held."""
    command_id = stored_command.command_id
    await insert_event(pool, command_id, 1, data=b".")
    await insert_event(pool, command_id, 5, data=b".")
    await pool.execute(
        "INSERT INTO gaps (command_id, first_missing, last_missing) VALUES ($1, 2, 4)",
        command_id,
    )
    started = time.monotonic()
    page = await _page(client, command_id, after=1, wait=8)
    assert time.monotonic() - started < 4
    assert page["waiting_for"] == 2
    assert page["gaps"][0]["recorded"] is True


async def test_unknown_command_is_404(client: httpx.AsyncClient) -> None:
    """Reading a command that does not exist answers 404."""
    response = await client.get(f"/api/commands/{uuid.uuid4()}/events")
    assert response.status_code == 404


async def test_limit_is_capped_by_settings(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """A limit above page_limit_max returns page_limit_max events, flagged more."""
    command_id = stored_command.command_id
    await pool.executemany(
        "INSERT INTO events (command_id, sequence, id, kind, stream, data)"
        " VALUES ($1, $2, gen_random_uuid(), 'output', 'stdout', '\\x2e')",
        [(command_id, sequence) for sequence in range(1, 1101)],
    )
    page = await _page(client, command_id, after=0, limit=5000)
    assert len(page["events"]) == 1000
    assert page["more"] is True
    assert page["waiting_for"] is None
