"""The relay against a real sink server and a real Postgres: order, wake-ups, state."""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg
import pytest

from broker.relay import Relay, RelaySettings
from core.errors import ConfigurationError
from tests.broker.relay_harness import (
    Answer,
    delivery_state,
    new_command,
    running_relay,
    running_sink,
    store_events,
    wait_for_cursor,
    wait_for_state,
    wait_until,
)


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
        # Far below the minute a scan would take, with room for a busy machine.
        assert time.monotonic() - stored_at < 10.0


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
        # One fallback interval (1 s), plus room for a busy machine.
        assert time.monotonic() - stored_at < 1.0 + 4.0

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


async def test_a_gap_is_held_then_skipped_and_late_events_follow(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """Missing 4-5 holds the command, then the gap is recorded and 6-8 go on;
    4-5 stored later are delivered flagged late, and the command then finishes."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, [1, 2, 3, 6, 7, 8], exit_at=8)

    async with (
        running_sink() as sink,
        running_relay(database_url, sink, relay_gap_hold=1.5),
    ):
        await wait_until(lambda: len(sink.applied) == 6, within=30)

        gap = await pool.fetchrow(
            "SELECT * FROM gaps WHERE command_id = $1", command_id
        )
        assert (gap["first_missing"], gap["last_missing"]) == (4, 5)
        held = gap["skipped_at"] - gap["detected_at"]
        assert held.total_seconds() >= 1.5
        state = await wait_for_cursor(pool, command_id, 8)
        assert state["delivered_through"] == 8
        assert state["state"] == "active", "an unfilled gap keeps the command open"

        await store_events(pool, command_id, [4, 5])
        await wait_until(lambda: len(sink.applied) == 8, within=30)
        await wait_for_state(pool, command_id, "finished")

    assert sink.applied_sequences(command_id) == [1, 2, 3, 6, 7, 8, 4, 5]
    assert [e.late for e in sink.applied] == [False] * 6 + [True] * 2
    assert sink.requests[-1].late
    late_rows = await pool.fetch(
        "SELECT first_sequence, last_sequence FROM deliveries "
        "WHERE command_id = $1 AND late",
        command_id,
    )
    assert [(r["first_sequence"], r["last_sequence"]) for r in late_rows] == [(4, 5)]


async def test_a_gap_filled_in_time_leaves_no_trace(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """Events that arrive within the hold are delivered in order, and no gap stays."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, [1, 2, 5, 6])

    async with (
        running_sink() as sink,
        running_relay(database_url, sink, relay_gap_hold=60.0),
    ):
        await wait_until(lambda: len(sink.applied) == 2, within=30)
        await asyncio.sleep(0.3)
        await store_events(pool, command_id, [3, 4])
        await wait_until(lambda: len(sink.applied) == 6, within=30)

    assert sink.applied_sequences(command_id) == [1, 2, 3, 4, 5, 6]
    assert not any(e.late for e in sink.applied)
    assert await pool.fetchval("SELECT count(*) FROM gaps") == 0


async def test_single_event_mode_sends_one_event_per_request(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """For a predecessor's sink each request is one event with its own delivery id."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 13), exit_at=12)

    async with (
        running_sink(single_event=True) as sink,
        running_relay(database_url, sink),
    ):
        await wait_until(lambda: len(sink.applied) == 12, within=30)
        await wait_for_state(pool, command_id, "finished")

    assert [len(r.events) for r in sink.requests] == [1] * 12
    assert [r.delivery_id for r in sink.requests] == [
        f"{command_id}:{n}-{n}" for n in range(1, 13)
    ]
    assert sink.applied_sequences(command_id) == list(range(1, 13))
    logged = await pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE command_id = $1", command_id
    )
    assert logged == 12


async def test_single_event_mode_resumes_after_the_event_that_failed(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """A failure mid-batch keeps what got through and retries from the failed event."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 9))

    async with running_sink(single_event=True) as sink:

        async def fail_fourth(number: int, _delivery_id: str) -> Answer:
            return Answer(500) if number == 3 else Answer()

        sink.behaviour = fail_fourth
        async with running_relay(database_url, sink, relay_backoff_base=0.2):
            await wait_until(lambda: len(sink.applied) == 8, within=30)

    assert sink.applied_sequences(command_id) == list(range(1, 9))
    assert [r.delivery_id for r in sink.requests[3:5]] == [f"{command_id}:4-4"] * 2
