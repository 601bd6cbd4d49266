"""The relay against a real sink server and a real Postgres: order, wake-ups, state."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from broker.relay import Relay, RelaySettings
from core.errors import ConfigurationError
from tests.broker.relay_test_sink import (
    SECRET,
    Answer,
    TestSink,
    running_sink,
    store_events,
    wait_until,
)
from tests.conftest import create_command, register_runner


def relay_settings(sink: TestSink, **overrides: Any) -> RelaySettings:
    """Settings for a relay bound to ``sink``, quick enough for tests."""
    values: dict[str, Any] = {
        "sink_url": sink.url,
        "signing_secret": SECRET,
        "relay_request_timeout": 5.0,
        "relay_lease_duration": 30.0,
        "relay_scan_interval": 0.5,
        "relay_single_event_mode": sink.single_event,
    }
    values.update(overrides)
    return RelaySettings(**values)


@contextlib.asynccontextmanager
async def running_relay(
    database_url: str, sink: TestSink, **overrides: Any
) -> AsyncIterator[Relay]:
    """A started relay, stopped on exit."""
    relay = Relay(relay_settings(sink, **overrides), database_url)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


async def new_command(pool: asyncpg.Pool, runner_name: str = "laptop") -> uuid.UUID:
    """A queued command, with its relay state row, on a fresh or known runner."""
    runner_id = await pool.fetchval(
        "SELECT id FROM runners WHERE name = $1", runner_name
    )
    if runner_id is None:
        runner_id = (await register_runner(pool, runner_name)).id
    return await create_command(pool, runner_id, ["make"])


async def delivery_state(pool: asyncpg.Pool, command_id: uuid.UUID) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT * FROM command_delivery WHERE command_id = $1", command_id
    )
    assert row is not None
    return row


async def wait_for_state(
    pool: asyncpg.Pool, command_id: uuid.UUID, state: str, within: float = 30
) -> asyncpg.Record:
    """Poll the command's relay state until it is ``state``; return the row."""
    deadline = time.monotonic() + within
    while True:
        row = await delivery_state(pool, command_id)
        if row["state"] == state:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"command stayed {row['state']}, not {state}")
        await asyncio.sleep(0.05)


def test_settings_without_a_secret_are_refused() -> None:
    """A relay cannot start unsigned: the error names RUNLEDGER_SIGNING_SECRET."""
    with pytest.raises(ConfigurationError, match="RUNLEDGER_SIGNING_SECRET"):
        Relay(RelaySettings(), "postgresql://127.0.0.1/none")


def test_settings_refuse_a_lease_shorter_than_a_request() -> None:
    """A lease that could expire mid-request is a configuration error."""
    with pytest.raises(ConfigurationError, match="LEASE_DURATION"):
        RelaySettings(
            signing_secret="s", relay_request_timeout=10.0, relay_lease_duration=5.0
        ).validate()


async def test_events_arrive_in_order_with_random_sink_latency(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """200 events stored in bursts reach a jittery sink once each, in order 1..200."""
    command_id = await new_command(pool)
    other_id = await new_command(pool)

    async with running_sink() as sink:

        async def jittery(_number: int, _delivery_id: str) -> Answer:
            await asyncio.sleep(random.uniform(0.0, 0.03))
            return Answer()

        sink.behaviour = jittery
        async with running_relay(database_url, sink, relay_batch_max_events=7):
            for start in range(1, 201, 20):
                await store_events(pool, command_id, range(start, start + 20))
                await store_events(pool, other_id, range(start, start + 20))
                await asyncio.sleep(random.uniform(0.0, 0.05))
            await wait_until(lambda: len(sink.applied) == 400, within=60)

    assert sink.applied_sequences(command_id) == list(range(1, 201))
    assert sink.applied_sequences(other_id) == list(range(1, 201))
    assert sink.refused_signatures == 0
    assert all(len(request.events) <= 7 for request in sink.requests)
    state = await delivery_state(pool, command_id)
    assert state["delivered_through"] == 200
    assert state["lease_owner"] is None


async def test_deliveries_are_logged_with_stable_ids(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """Every request is one row in deliveries, its id naming the command and range."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 26))

    async with (
        running_sink() as sink,
        running_relay(database_url, sink, relay_batch_max_events=10),
    ):
        await wait_until(lambda: len(sink.applied) == 25, within=30)

    rows = await pool.fetch(
        "SELECT delivery_id, first_sequence, last_sequence, event_count, late "
        "FROM deliveries WHERE command_id = $1 ORDER BY first_sequence",
        command_id,
    )
    assert [(r["first_sequence"], r["last_sequence"]) for r in rows] == [
        (1, 10),
        (11, 20),
        (21, 25),
    ]
    assert [r["delivery_id"] for r in rows] == [
        request.delivery_id for request in sink.requests
    ]
    assert rows[0]["delivery_id"] == f"{command_id}:1-10"
    assert not any(r["late"] for r in rows)


async def test_batches_are_bounded_by_bytes(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """A batch stops before the byte budget, but one larger event still goes alone."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 11), data_size=400)
    await store_events(pool, command_id, [11], data_size=5000)

    async with (
        running_sink() as sink,
        running_relay(database_url, sink, relay_batch_max_bytes=1000),
    ):
        await wait_until(lambda: len(sink.applied) == 11, within=30)

    sizes = [[len(e.data) for e in request.events] for request in sink.requests]
    assert sizes == [[400, 400], [400, 400], [400, 400], [400, 400], [400, 400], [5000]]


async def test_a_notification_wakes_the_relay_at_once(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """With a fallback scan of a minute, a stored event still goes out at once."""
    command_id = await new_command(pool)
    async with (
        running_sink() as sink,
        running_relay(database_url, sink, relay_scan_interval=60.0),
    ):
        await asyncio.sleep(0.2)
        stored_at = time.monotonic()
        await store_events(pool, command_id, [1])
        await wait_until(lambda: len(sink.applied) == 1, within=10, interval=0.005)
        assert time.monotonic() - stored_at < 2.0


async def test_events_without_a_notification_are_found_by_the_scan(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """Events committed without NOTIFY are delivered by the fallback scan."""
    command_id = await new_command(pool)
    async with (
        running_sink() as sink,
        running_relay(database_url, sink, relay_scan_interval=0.5),
    ):
        await asyncio.sleep(0.2)
        await pool.execute(
            "INSERT INTO events (command_id, sequence, id, kind) "
            "VALUES ($1, 1, gen_random_uuid(), 'progress')",
            command_id,
        )
        await wait_until(lambda: len(sink.applied) == 1, within=10)


async def test_a_killed_listener_still_gets_events_delivered(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """After pg_terminate_backend on the LISTEN connection, events still arrive
    within the fallback interval, and the relay listens again."""
    command_id = await new_command(pool)
    async with (
        running_sink() as sink,
        running_relay(database_url, sink, relay_scan_interval=1.0) as relay,
    ):
        assert relay._listener is not None
        listener_pid = relay._listener.get_server_pid()
        terminated = await pool.fetchval(
            "SELECT pg_terminate_backend($1)", listener_pid
        )
        assert terminated

        await store_events(pool, command_id, range(1, 6))
        stored_at = time.monotonic()
        await wait_until(lambda: len(sink.applied) == 5, within=10, interval=0.01)
        # One fallback interval, plus room for a busy machine.
        assert time.monotonic() - stored_at < 1.0 + 2.0

        await wait_until(
            lambda: (
                relay._listener is not None
                and not relay._listener.is_closed()
                and relay._listener.get_server_pid() != listener_pid
            ),
            within=10,
        )
        # The new listener wakes workers again.
        await store_events(pool, command_id, range(6, 11))
        await wait_until(lambda: len(sink.applied) == 10, within=10)

    assert sink.applied_sequences(command_id) == list(range(1, 11))


async def test_delivery_of_the_exit_event_finishes_the_command(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """Once the exit event is delivered the command leaves the relay's scans."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 6), exit_at=5)
    async with running_sink() as sink, running_relay(database_url, sink):
        await wait_until(lambda: len(sink.applied) == 5, within=30)

    state = await delivery_state(pool, command_id)
    assert state["state"] == "finished"
    assert state["delivered_through"] == 5
    assert sink.applied[-1].kind == "exit"
    assert sink.applied[-1].payload == {"status": "succeeded", "exit_code": 0}


async def test_deliveries_are_signed_for_the_sink(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """A sink with another secret refuses the delivery; the relay parks it dead."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 3))
    async with (
        running_sink() as sink,
        running_relay(database_url, sink, signing_secret="another"),
    ):
        await wait_for_state(pool, command_id, "dead")

    assert sink.applied == []
    assert sink.refused_signatures == 1
    state = await delivery_state(pool, command_id)
    assert state["last_status"] == 401
    assert "signature does not match" in state["last_error"]
