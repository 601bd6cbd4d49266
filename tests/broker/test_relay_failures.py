"""The relay when the sink misbehaves: errors, throttling, timeouts, slowness."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime
from email.utils import format_datetime

import asyncpg
import pytest

from tests.broker.relay_harness import (
    Answer,
    answering,
    delivery_state,
    new_command,
    running_relay,
    running_sink,
    store_events,
    wait_for_state,
    wait_until,
)

OUTAGE_SECONDS = 20.0

# Age in seconds of the oldest open transaction of this database, but ours.
OLDEST_TRANSACTION = """
SELECT max(extract(epoch FROM clock_timestamp() - xact_start))
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


@pytest.mark.slow
async def test_a_sink_failing_for_twenty_seconds_gets_everything_once_in_order(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """500s for 20 s, then recovery: every event arrives, in order, exactly once."""
    first_id = await new_command(pool)
    second_id = await new_command(pool)
    outage_ends = time.monotonic() + OUTAGE_SECONDS

    async with running_sink() as sink:

        async def failing_then_fine(_number: int, _delivery_id: str) -> Answer:
            if time.monotonic() < outage_ends:
                return Answer(500, body=b"database is down")
            return Answer()

        sink.behaviour = failing_then_fine
        async with running_relay(database_url, sink, relay_batch_max_events=25):
            # Events keep coming during the outage.
            for start in range(1, 101, 10):
                await store_events(pool, first_id, range(start, start + 10))
                await store_events(pool, second_id, range(start, start + 10))
                await asyncio.sleep(0.5)
            await wait_until(
                lambda: len(sink.applied) == 200, within=OUTAGE_SECONDS + 40
            )

    assert sink.applied_sequences(first_id) == list(range(1, 101))
    assert sink.applied_sequences(second_id) == list(range(1, 101))
    accepted = [r.delivery_id for r in sink.requests if r.status == 200]
    assert len(accepted) == len(set(accepted)), "a delivery was accepted twice"
    assert sink.duplicates == 0
    assert any(r.status == 500 for r in sink.requests)

    state = await delivery_state(pool, first_id)
    assert state["attempts"] == 0
    assert state["last_error"] is None
    assert state["state"] == "active"


async def _first_throttled_then_fine(
    pool: asyncpg.Pool, database_url: str, retry_after: str, not_before: float | None
) -> None:
    """Answer the first request 429 with ``retry_after``; check nobody comes early.

    A second command's events are stored only after the 429 went out, so its
    first request can only be early if the pause was not shared by all workers.
    """
    throttled_id = await new_command(pool)
    other_id = await new_command(pool)
    answered_at: list[float] = []

    async with running_sink() as sink:

        async def throttle_first(number: int, _delivery_id: str) -> Answer:
            if number == 0:
                answered_at.append(time.time())
                return Answer(429, headers={"retry-after": retry_after})
            return Answer()

        sink.behaviour = throttle_first
        async with running_relay(database_url, sink):
            await store_events(pool, throttled_id, range(1, 6))
            await wait_until(lambda: bool(answered_at), within=30)
            await store_events(pool, other_id, range(1, 6))
            await wait_until(lambda: len(sink.applied) == 10, within=30)

    earliest = not_before if not_before is not None else answered_at[0] + 2.0
    later = sink.requests[1:]
    assert later, "the relay never came back"
    assert min(r.arrived_at for r in later) >= earliest
    assert sink.applied_sequences(throttled_id) == [1, 2, 3, 4, 5]
    assert sink.applied_sequences(other_id) == [1, 2, 3, 4, 5]
    # The retry resent the same events under the same delivery id.
    retried = [r for r in later if r.delivery_id == sink.requests[0].delivery_id]
    assert retried


async def test_retry_after_in_seconds_is_honoured_by_every_worker(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """429 with Retry-After: 2: no request at all reaches the sink for 2 s."""
    await _first_throttled_then_fine(pool, database_url, "2", None)


async def test_retry_after_as_a_date_is_honoured_by_every_worker(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """429 with an HTTP-date Retry-After: no request reaches the sink before it."""
    not_before = math.ceil(time.time()) + 3
    date = format_datetime(datetime.fromtimestamp(not_before, UTC), usegmt=True)
    await _first_throttled_then_fine(pool, database_url, date, float(not_before))


async def test_a_503_slows_the_command_and_is_retried(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """503 without Retry-After is retried after the backoff, not parked."""
    command_id = await new_command(pool)
    async with running_sink() as sink:

        async def unavailable_once(number: int, _delivery_id: str) -> Answer:
            return Answer(503) if number == 0 else Answer()

        sink.behaviour = unavailable_once
        async with running_relay(database_url, sink, relay_backoff_base=0.5):
            await store_events(pool, command_id, range(1, 4))
            await wait_until(lambda: len(sink.applied) == 3, within=30)

    assert sink.requests[1].arrived_at - sink.requests[0].arrived_at >= 0.5


async def test_a_sink_that_commits_then_times_out_applies_each_event_once(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """The sink applies, then answers after the relay gave up: the retry carries
    the same delivery id, so the sink drops it and each event is applied once."""
    command_id = await new_command(pool)
    async with running_sink() as sink:

        async def slow_after_commit(number: int, _delivery_id: str) -> Answer:
            return Answer(delay_after_apply=3.0 if number == 0 else 0.0)

        sink.behaviour = slow_after_commit
        async with running_relay(
            database_url,
            sink,
            relay_request_timeout=1.0,
            relay_lease_duration=5.0,
            relay_backoff_base=0.2,
        ):
            await store_events(pool, command_id, range(1, 11))
            await wait_until(lambda: len(sink.requests) >= 1, within=30)
            # Events stored meanwhile do not change what the retry sends.
            await store_events(pool, command_id, range(11, 21))
            await wait_until(lambda: len(sink.applied) == 20, within=30)
            await wait_until(lambda: sink.duplicates == 1, within=30)

    assert sink.applied_sequences(command_id) == list(range(1, 21))
    assert sink.requests[0].delivery_id == f"{command_id}:1-10"
    assert sink.requests[1].delivery_id == f"{command_id}:1-10"


async def test_a_slow_sink_never_holds_a_transaction_open(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """With a sink taking 30 s per request, no relay transaction lives 1 s."""
    command_ids = [await new_command(pool) for _ in range(4)]
    longest = 0.0

    async with running_sink() as sink:

        async def very_slow(_number: int, _delivery_id: str) -> Answer:
            await asyncio.sleep(30.0)
            return Answer()

        sink.behaviour = very_slow
        async with running_relay(
            database_url,
            sink,
            relay_request_timeout=2.0,
            relay_lease_duration=4.0,
            relay_backoff_base=0.2,
            relay_backoff_cap=0.5,
        ):
            for command_id in command_ids:
                await store_events(pool, command_id, range(1, 51))

            # Sample every backend of this database while requests hang and time out.
            sampling_ends = time.monotonic() + 6.0
            async with pool.acquire() as sampler:
                while time.monotonic() < sampling_ends:
                    oldest = await sampler.fetchval(OLDEST_TRANSACTION)
                    longest = max(longest, float(oldest or 0.0))
                    await asyncio.sleep(0.02)
            hung = len(sink.requests)

    assert hung >= 4, "the relay should have had requests hanging at the sink"
    assert longest < 1.0
    state = await delivery_state(pool, command_ids[0])
    assert state["attempts"] >= 1
    assert "did not answer within 2 s" in state["last_error"]


async def test_a_client_error_parks_the_command_dead(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """A 400 is not retried: the command is dead with the status and the sink's text."""
    command_id = await new_command(pool)
    async with running_sink() as sink:
        sink.behaviour = answering(Answer(400, body=b"unknown event kind"))
        async with running_relay(database_url, sink):
            await store_events(pool, command_id, range(1, 4))
            state = await wait_for_state(pool, command_id, "dead")

    assert len(sink.requests) == 1
    assert state["last_status"] == 400
    assert state["last_error"] == "sink answered 400: unknown event kind"
    assert (state["pending_first_sequence"], state["pending_last_sequence"]) == (1, 3)
    assert state["lease_owner"] is None


async def test_exhausted_attempts_park_the_command_dead(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """After the configured number of failed tries the command is parked dead."""
    command_id = await new_command(pool)
    async with running_sink() as sink:
        sink.behaviour = answering(Answer(500, body=b"boom"))
        async with running_relay(
            database_url,
            sink,
            relay_max_attempts=3,
            relay_backoff_base=0.1,
            relay_backoff_cap=0.2,
        ):
            await store_events(pool, command_id, range(1, 4))
            state = await wait_for_state(pool, command_id, "dead")

    assert len(sink.requests) == 3
    assert state["attempts"] == 3
    assert state["last_status"] == 500


async def test_retries_past_the_maximum_age_park_the_command_dead(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """A command failing for longer than the maximum age is parked dead."""
    command_id = await new_command(pool)
    async with running_sink() as sink:
        sink.behaviour = answering(Answer(502))
        async with running_relay(
            database_url,
            sink,
            relay_max_age=1.0,
            relay_backoff_base=0.3,
            relay_backoff_cap=0.3,
        ):
            await store_events(pool, command_id, range(1, 4))
            state = await wait_for_state(pool, command_id, "dead")

    assert 2 <= state["attempts"] < 50
    assert state["last_status"] == 502


async def test_an_expired_lease_is_taken_over(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """A command leased by a relay that died is delivered once its lease expires."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 4))
    await pool.execute(
        "UPDATE command_delivery SET lease_owner = 'gone:1:dead/0', "
        "lease_expires_at = now() + interval '1.5 seconds' WHERE command_id = $1",
        command_id,
    )
    async with running_sink() as sink, running_relay(database_url, sink):
        await asyncio.sleep(0.5)
        assert sink.applied == []
        await wait_until(lambda: len(sink.applied) == 3, within=30)


async def test_a_stopped_relay_gives_its_commands_back(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """Stopping in the middle of a hanging delivery releases the lease at once,
    so another relay delivers without waiting for it to expire."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 4))

    async with running_sink() as sink:
        hanging = True

        async def hang_while_first(_number: int, _delivery_id: str) -> Answer:
            if hanging:
                await asyncio.sleep(30)
            return Answer()

        sink.behaviour = hang_while_first
        async with running_relay(database_url, sink, relay_lease_duration=300.0):
            await wait_until(lambda: len(sink.requests) == 1, within=30)
        state = await delivery_state(pool, command_id)
        assert state["lease_owner"] is None

        hanging = False
        async with running_relay(database_url, sink):
            await wait_until(lambda: len(sink.applied) == 3, within=10)


async def test_the_relay_survives_losing_all_its_connections(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """Every relay backend terminated at once: the relay reconnects and goes on."""
    command_id = await new_command(pool)
    async with running_sink() as sink, running_relay(database_url, sink):
        await store_events(pool, command_id, range(1, 11))
        await wait_until(lambda: len(sink.applied) == 10, within=30)

        # The test's own pooled connections go too; the pool replaces them.
        terminated = await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert terminated >= 2
        await asyncio.sleep(0.2)

        await store_events(pool, command_id, range(11, 21))
        await wait_until(lambda: len(sink.applied) == 20, within=30)

    assert sink.applied_sequences(command_id) == list(range(1, 21))


async def test_a_relay_cut_off_mid_delivery_is_resumed_under_the_same_id(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """The sink applied a batch but the relay died before recording it; events
    stored since do not change what the next relay resends first, so the
    sink drops the resend by its delivery id and applies each event once."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 11))

    async with running_sink() as sink:

        async def apply_then_hang_once(number: int, _delivery_id: str) -> Answer:
            return Answer(delay_after_apply=30.0 if number == 0 else 0.0)

        sink.behaviour = apply_then_hang_once
        async with running_relay(database_url, sink):
            await wait_until(lambda: len(sink.applied) == 10, within=30)
            await store_events(pool, command_id, range(11, 21))
        # The stop cut the hanging request: nothing about it was recorded.
        state = await delivery_state(pool, command_id)
        assert state["delivered_through"] == 0

        async with running_relay(database_url, sink):
            await wait_until(lambda: len(sink.applied) == 20, within=30)
            await wait_until(lambda: sink.duplicates == 1, within=30)

    assert sink.applied_sequences(command_id) == list(range(1, 21))
    assert [r.delivery_id for r in sink.requests[:2]] == [f"{command_id}:1-10"] * 2
