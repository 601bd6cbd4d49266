"""Retention removes old, finished, delivered commands' rows and nothing else."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import datetime, timedelta

import asyncpg
import pytest

from core.errors import ConfigurationError
from core.retention import (
    PruneProgress,
    RetentionSettings,
    prune_once,
    run_retention_loop,
)
from core.settings import load_settings
from tests.delivery_history import (
    finish_command,
    new_command,
    record_delivery,
    store_events,
)

SETTINGS = RetentionSettings(retention_days=7, retention_batch_size=100)


async def database_now(pool: asyncpg.Pool) -> datetime:
    now: datetime = await pool.fetchval("SELECT now()")
    return now


async def delivered_command(
    pool: asyncpg.Pool,
    *,
    events: int = 10,
    age: timedelta = timedelta(days=30),
    data: bytes = b"",
) -> uuid.UUID:
    """A command that finished ``age`` ago with every event delivered."""
    finished_at = await database_now(pool) - age
    command_id = await new_command(pool)
    await store_events(
        pool, command_id, range(1, events + 1), finished_at - timedelta(seconds=5), data
    )
    await record_delivery(pool, command_id, 1, events, finished_at)
    await pool.execute(
        "INSERT INTO applied_deliveries (delivery_id, command_id) VALUES ($1, $2)",
        f"{command_id}:1-{events}",
        command_id,
    )
    await pool.execute(
        "UPDATE command_delivery SET state = 'finished' WHERE command_id = $1",
        command_id,
    )
    await finish_command(pool, command_id, finished_at)
    return command_id


async def rows_of(pool: asyncpg.Pool, table: str, command_id: uuid.UUID) -> int:
    count: int = await pool.fetchval(
        f"SELECT count(*) FROM {table} WHERE command_id = $1",  # noqa: S608
        command_id,
    )
    return count


async def test_prunes_an_old_delivered_command_in_batches(pool: asyncpg.Pool) -> None:
    """Events, deliveries, gaps and applied marks go, in batches of the set size."""
    command_id = await delivered_command(pool, events=250)
    await pool.execute(
        "INSERT INTO gaps (command_id, first_missing, last_missing) VALUES ($1, 7, 7)",
        command_id,
    )
    updates: list[PruneProgress] = []

    report = await prune_once(pool, SETTINGS, updates.append)

    assert report.commands_pruned == 1
    assert report.events_removed == 250
    assert report.deliveries_removed == 1
    assert report.gaps_removed == 1
    assert report.applied_deliveries_removed == 1
    assert report.largest_batch == 100
    assert [u.rows for u in updates if u.step == "events"] == [100, 100, 50]
    assert updates[-1].step == "done"
    for table in ("events", "deliveries", "gaps", "applied_deliveries"):
        assert await rows_of(pool, table, command_id) == 0

    # The command itself stays, recorded as pruned and not lost.
    pruned = await pool.fetchrow(
        "SELECT * FROM pruned_commands WHERE command_id = $1", command_id
    )
    assert pruned["events_removed"] == 250
    assert pruned["highest_sequence"] == 250
    assert pruned["completed_at"] is not None
    audit = await pool.fetchrow(
        "SELECT lost, pruned_at FROM audit_commands WHERE command_id = $1", command_id
    )
    assert audit["lost"] is False
    assert audit["pruned_at"] is not None


async def test_keeps_commands_that_are_recent_running_or_not_fully_delivered(
    pool: asyncpg.Pool,
) -> None:
    """Only old, finished, delivered, complete, verified commands are pruned."""
    prunable = await delivered_command(pool)
    recent = await delivered_command(pool, age=timedelta(days=1))

    running = await delivered_command(pool)
    await pool.execute("UPDATE commands SET status = 'running' WHERE id = $1", running)

    undelivered = await delivered_command(pool)
    await store_events(pool, undelivered, [11], await database_now(pool))

    dead = await delivered_command(pool)
    await store_events(pool, dead, [11], await database_now(pool))
    await pool.execute(
        "UPDATE command_delivery SET state = 'dead' WHERE command_id = $1", dead
    )

    missing = await delivered_command(pool)
    await pool.execute(
        "DELETE FROM events WHERE command_id = $1 AND sequence = 4", missing
    )

    unverified = await delivered_command(pool)
    await pool.execute(
        "UPDATE commands SET verification_matched = false WHERE id = $1", unverified
    )

    leased = await delivered_command(pool)
    await pool.execute(
        "UPDATE command_delivery SET lease_owner = 'relay-1', "
        "lease_expires_at = now() + interval '1 minute' WHERE command_id = $1",
        leased,
    )

    kept_reasons: dict[uuid.UUID, str] = {}

    def note(update: PruneProgress) -> None:
        if update.step == "kept":
            kept_reasons[update.command_id] = update.detail

    report = await prune_once(pool, SETTINGS, note)

    assert report.commands_pruned == 1
    assert await rows_of(pool, "events", prunable) == 0
    for kept in (recent, running, undelivered, dead, missing, unverified, leased):
        assert await rows_of(pool, "events", kept) > 0
    assert kept_reasons == {
        undelivered: "events are undelivered",
        missing: "events are missing",
        unverified: "verification failed",
        leased: "a relay holds it",
    }


async def test_an_interrupted_pruning_is_finished_by_the_next_pass(
    pool: asyncpg.Pool,
) -> None:
    """A command whose pruning started but did not complete is completed."""
    command_id = await delivered_command(pool, events=30)
    await pool.execute(
        "INSERT INTO pruned_commands (command_id, highest_sequence) VALUES ($1, 30)",
        command_id,
    )
    await pool.execute(
        "DELETE FROM events WHERE command_id = $1 AND sequence > 20", command_id
    )

    report = await prune_once(pool, SETTINGS)

    assert report.commands_pruned == 1
    assert report.events_removed == 20
    assert await rows_of(pool, "events", command_id) == 0
    completed_at = await pool.fetchval(
        "SELECT completed_at FROM pruned_commands WHERE command_id = $1", command_id
    )
    assert completed_at is not None


async def test_an_event_stored_after_pruning_began_is_left_for_the_relay(
    pool: asyncpg.Pool,
) -> None:
    """Only events judged delivered are removed; a later arrival stays."""
    command_id = await delivered_command(pool, events=5)
    started_at = await database_now(pool) - timedelta(minutes=1)
    await pool.execute(
        "INSERT INTO pruned_commands (command_id, highest_sequence, started_at) "
        "VALUES ($1, 5, $2)",
        command_id,
        started_at,
    )
    await store_events(pool, command_id, [6], await database_now(pool))

    await prune_once(pool, SETTINGS)

    sequences = await pool.fetch(
        "SELECT sequence FROM events WHERE command_id = $1", command_id
    )
    assert [row["sequence"] for row in sequences] == [6]


async def test_a_pass_walks_past_many_kept_commands(pool: asyncpg.Pool) -> None:
    """Kept commands finished earlier never hide prunable ones from a pass."""
    for _ in range(5):
        kept = await delivered_command(pool, age=timedelta(days=40))
        await pool.execute(
            "UPDATE commands SET verification_matched = false WHERE id = $1", kept
        )
    prunable = await delivered_command(pool, age=timedelta(days=30))

    report = await prune_once(pool, replace(SETTINGS, retention_scan_size=2))

    assert report.commands_examined == 6
    assert report.commands_pruned == 1
    assert await rows_of(pool, "events", prunable) == 0


async def test_settings_refuse_a_non_positive_retention() -> None:
    """A zero or negative retention is a configuration error naming the form."""
    with pytest.raises(ConfigurationError, match="RUNLEDGER_RETENTION_DAYS"):
        load_settings(RetentionSettings, environ={"RUNLEDGER_RETENTION_DAYS": "0"})
    settings = load_settings(
        RetentionSettings, environ={"RUNLEDGER_RETENTION_DAYS": "0.5"}
    )
    assert settings.retention_days == 0.5


async def test_the_retention_loop_prunes_on_its_interval_until_cancelled(
    pool: asyncpg.Pool,
) -> None:
    """run_retention_loop keeps passing; cancelling it ends it cleanly."""
    settings = replace(SETTINGS, retention_interval=0.05)
    loop = asyncio.create_task(run_retention_loop(pool, settings))
    try:
        # A command that becomes prunable while the loop already runs.
        await asyncio.sleep(0.1)
        command_id = await delivered_command(pool)
        deadline = asyncio.get_running_loop().time() + 30
        while await rows_of(pool, "events", command_id):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    assert await rows_of(pool, "events", command_id) == 0


async def _table_health(url: str, table: str) -> tuple[int, int]:
    """(dead tuples, total size in bytes) of ``table`` after VACUUM ANALYZE."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(f"VACUUM (ANALYZE) {table}")
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            # Statistics reach this session asynchronously; read a fresh copy.
            await connection.execute("SELECT pg_stat_clear_snapshot()")
            row = await connection.fetchrow(
                "SELECT n_dead_tup, last_vacuum, pg_total_relation_size(relid) AS size "
                "FROM pg_stat_user_tables WHERE relname = $1",
                table,
            )
            if row["last_vacuum"] is not None or (
                asyncio.get_running_loop().time() > deadline
            ):
                return int(row["n_dead_tup"]), int(row["size"])
            await asyncio.sleep(0.2)
    finally:
        await connection.close()


@pytest.mark.slow
async def test_dead_tuples_and_size_stay_flat_over_prune_cycles(
    database_url: str,
) -> None:
    """Repeated fill-and-prune cycles leave no dead tuples after VACUUM and
    reuse the freed space instead of growing the table."""
    cycles = 8
    commands_per_cycle = 10
    events_per_command = 300
    payload = b"x" * 200
    sizes: list[int] = []
    dead_tuples: list[int] = []
    filled_sizes: list[int] = []

    for _ in range(cycles):
        # A pool per cycle: closing it ends its sessions, which sends their
        # statistics before VACUUM is asked about them.
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
        assert pool is not None
        try:
            for _ in range(commands_per_cycle):
                await delivered_command(pool, events=events_per_command, data=payload)
            filled_sizes.append(
                await pool.fetchval("SELECT pg_total_relation_size('events')")
            )
            report = await prune_once(pool, replace(SETTINGS, retention_batch_size=500))
            assert report.events_removed == commands_per_cycle * events_per_command
        finally:
            await pool.close()

        dead, size = await _table_health(database_url, "events")
        dead_tuples.append(dead)
        sizes.append(size)

    assert dead_tuples == [0] * cycles, dead_tuples
    # Two cycles warm the table and its indexes up to their working size;
    # after that, freed space is reused rather than the table growing.
    assert max(filled_sizes[2:]) <= filled_sizes[1] * 1.1, filled_sizes
    assert max(sizes[2:]) <= sizes[1] * 1.1, sizes


async def test_a_failing_pass_does_not_end_the_retention_loop(
    pool: asyncpg.Pool,
) -> None:
    """A pass that fails (here: a view it reads is gone) is logged; the loop
    carries on to the next interval."""
    await delivered_command(pool)
    await pool.execute("DROP VIEW audit_system, audit_runners, audit_commands")
    settings = replace(SETTINGS, retention_interval=0.05)

    loop = asyncio.create_task(run_retention_loop(pool, settings))
    await asyncio.sleep(0.5)
    try:
        assert not loop.done()
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
