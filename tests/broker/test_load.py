"""Many runners at once: every event stored once, nothing left behind."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from broker.ingest import WAITING_TASK_NAME
from broker.server import BrokerServer
from core.tokens import hash_token, new_token
from tests.broker.wire_client import WireRunner, output_event, poll_until

RUNNERS = 200


async def register_runners_with_commands(
    pool: asyncpg.Pool, count: int
) -> list[tuple[str, uuid.UUID]]:
    """``count`` runners, each with one dispatched command: (token, command id)."""
    tokens = [new_token() for _ in range(count)]
    runner_ids = await pool.fetch(
        "INSERT INTO runners (name, token_hash) "
        "SELECT 'load-' || n, hash "
        "FROM unnest($1::text[]) WITH ORDINALITY AS t(hash, n) "
        "RETURNING id, name",
        [hash_token(token) for token in tokens],
    )
    by_name = {row["name"]: row["id"] for row in runner_ids}
    ordered = [by_name[f"load-{n}"] for n in range(1, count + 1)]
    command_ids = await pool.fetch(
        "INSERT INTO commands (runner_id, argv, dispatched_at, status) "
        "SELECT runner_id, '[\"true\"]', now(), 'dispatched' "
        "FROM unnest($1::uuid[]) WITH ORDINALITY AS t(runner_id, n) ORDER BY n "
        "RETURNING id, runner_id",
        ordered,
    )
    command_of = {row["runner_id"]: row["id"] for row in command_ids}
    return [
        (token, command_of[rid]) for token, rid in zip(tokens, ordered, strict=True)
    ]


async def background_tasks() -> set[asyncio.Task[object]]:
    """Every task but this one and the writer's standing wait for frames."""
    return {
        task
        for task in asyncio.all_tasks()
        if task is not asyncio.current_task() and task.get_name() != WAITING_TASK_NAME
    }


@pytest.mark.slow
async def test_two_hundred_abrupt_disconnects_leave_nothing_behind(
    broker: BrokerServer, pool: asyncpg.Pool
) -> None:
    """Connections dropped mid-batch leave no session, task or database connection."""
    runners = await register_runners_with_commands(pool, RUNNERS)
    await asyncio.sleep(0.2)
    tasks_before = await background_tasks()

    async def connect_send_and_vanish(token: str, command_id: uuid.UUID) -> None:
        runner = await WireRunner.connect(broker.url, token)
        events = [output_event(command_id, n, b"cut short") for n in range(1, 21)]
        await runner.send_events(events)
        runner.connection.transport.abort()

    for start in range(0, RUNNERS, 50):
        await asyncio.gather(
            *(
                connect_send_and_vanish(*runner)
                for runner in runners[start : start + 50]
            )
        )

    async def settled() -> bool:
        leftover_tasks = (await background_tasks()) - tasks_before
        return not broker.sessions and not leftover_tasks

    await poll_until(settled, seconds=60)
    assert broker.sessions == []
    server = broker._server
    assert server is not None and not server.connections
    database_connections = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    )
    # The broker's pool and listener, plus the test's own pool.
    assert database_connections <= broker.settings.database_pool_size + 1 + 5
    disconnected = await pool.fetchval(
        "SELECT count(*) FROM runners WHERE disconnected_at IS NOT NULL"
    )
    assert disconnected == RUNNERS


@pytest.mark.slow
async def test_two_hundred_runners_streaming_at_once_store_every_event_once(
    broker: BrokerServer, pool: asyncpg.Pool
) -> None:
    """200 connected runners each stream batches; every event is stored exactly once."""
    runners = await register_runners_with_commands(pool, RUNNERS)
    batches, batch_size = 10, 20
    connected = await asyncio.gather(
        *(WireRunner.connect(broker.url, token) for token, _ in runners)
    )

    async def stream(runner: WireRunner, command_id: uuid.UUID) -> None:
        sent = []
        for batch in range(batches):
            events = [
                output_event(command_id, batch * batch_size + n, f"{n}".encode() * 50)
                for n in range(1, batch_size + 1)
            ]
            sent.extend(events)
            await runner.send_events(events)
        await runner.wait_settled(sent)
        assert not runner.refused
        assert len(runner.acknowledged) == batches * batch_size

    await asyncio.gather(
        *(
            stream(runner, command_id)
            for runner, (_, command_id) in zip(connected, runners, strict=True)
        )
    )
    await asyncio.gather(*(runner.close() for runner in connected))

    per_command = await pool.fetch(
        "SELECT command_id, count(*) AS events, count(DISTINCT id) AS ids, "
        "min(sequence) AS first, max(sequence) AS last FROM events GROUP BY command_id"
    )
    expected = batches * batch_size
    assert len(per_command) == RUNNERS
    assert all(
        (row["events"], row["ids"], row["first"], row["last"])
        == (expected, expected, 1, expected)
        for row in per_command
    )
