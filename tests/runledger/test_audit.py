"""The audit views (revision 0002) and ``runledger audit`` built on them.

Rows are inserted directly, as the broker, relay and web tier would write
them, so each figure can be checked against a known history.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import timedelta

import asyncpg
import pytest

from core.errors import DatabaseError
from runledger import audit
from tests.broker import relay_harness
from tests.conftest import register_runner
from tests.delivery_history import (
    BASE_TIME,
    finish_command,
    new_command,
    record_delivery,
    store_events,
)


async def command_audit(pool: asyncpg.Pool, command_id: uuid.UUID) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT * FROM audit_commands WHERE command_id = $1", command_id
    )
    assert row is not None
    return row


# The views -------------------------------------------------------------------


async def test_a_fully_delivered_command_is_healthy(pool: asyncpg.Pool) -> None:
    """All events stored and delivered: no missing, pending or dead; lag measured."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 6))
    await record_delivery(pool, command_id, 1, 2, BASE_TIME + timedelta(seconds=1))
    await record_delivery(pool, command_id, 3, 5, BASE_TIME + timedelta(seconds=3))
    await finish_command(pool, command_id)

    row = await command_audit(pool, command_id)

    assert row["events_stored"] == 5
    assert row["highest_sequence"] == 5
    assert row["contiguous_through"] == 5
    assert row["missing_events"] == 0
    assert row["missing_ranges"] is None
    assert row["delivered_events"] == 5
    assert row["pending_events"] == 0
    assert row["dead_events"] == 0
    assert row["oldest_pending_at"] is None
    assert row["lag_p50"] == timedelta(seconds=3)
    assert row["lag_max"] == timedelta(seconds=3)
    assert row["verification_matched"] is True
    assert row["lost"] is False
    assert row["dead"] is False


async def test_missing_sequences_are_listed_as_ranges(pool: asyncpg.Pool) -> None:
    """Holes show as the contiguous prefix, a count and readable ranges."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, [1, 2, 4, 8, 9])

    row = await command_audit(pool, command_id)

    assert row["contiguous_through"] == 2
    assert row["highest_sequence"] == 9
    assert row["missing_events"] == 4
    assert row["missing_ranges"] == "3, 5-7"
    # Still running and no gap skipped: the events may yet arrive.
    assert row["lost"] is False


async def test_a_missing_first_event_leaves_no_contiguous_prefix(
    pool: asyncpg.Pool,
) -> None:
    """Sequences start at 1, so events 3 and 4 alone mean 1-2 are missing."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, [3, 4])

    row = await command_audit(pool, command_id)

    assert row["contiguous_through"] == 0
    assert row["missing_ranges"] == "1-2"


async def test_holes_in_a_finished_command_are_lost(pool: asyncpg.Pool) -> None:
    """Once the command finished, missing sequences count as lost."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, [1, 3])
    await finish_command(pool, command_id)

    row = await command_audit(pool, command_id)

    assert row["lost"] is True


async def test_a_skipped_gap_is_lost_until_the_late_event_arrives(
    pool: asyncpg.Pool,
) -> None:
    """A gap the relay skipped is loss; the late event, once stored and
    delivered, clears it."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, [1, 2, 4])
    await record_delivery(pool, command_id, 1, 4, BASE_TIME + timedelta(seconds=2))
    await pool.execute(
        "INSERT INTO gaps (command_id, first_missing, last_missing, skipped_at) "
        "VALUES ($1, 3, 3, $2)",
        command_id,
        BASE_TIME,
    )

    skipped = await command_audit(pool, command_id)
    assert skipped["gaps_recorded"] == 1
    assert skipped["gaps_skipped"] == 1
    assert skipped["lost"] is True
    assert skipped["pending_events"] == 0

    # The late event is stored inside a delivery's range but was not in it.
    await store_events(pool, command_id, [3], BASE_TIME + timedelta(seconds=5))
    arrived = await command_audit(pool, command_id)
    assert arrived["lost"] is False
    assert arrived["pending_events"] == 1
    assert arrived["delivered_events"] == 3

    await record_delivery(
        pool, command_id, 3, 3, BASE_TIME + timedelta(seconds=6), late=True
    )
    delivered = await command_audit(pool, command_id)
    assert delivered["pending_events"] == 0
    assert delivered["delivered_events"] == 4


async def test_undelivered_events_are_pending_with_their_age(
    pool: asyncpg.Pool,
) -> None:
    """Events past the delivered ranges are pending, aged from the oldest."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, [1, 2])
    await store_events(pool, command_id, [3, 4], BASE_TIME + timedelta(minutes=1))
    await record_delivery(pool, command_id, 1, 2, BASE_TIME + timedelta(seconds=1))

    row = await command_audit(pool, command_id)

    assert row["delivered_events"] == 2
    assert row["pending_events"] == 2
    assert row["dead_events"] == 0
    assert row["oldest_pending_at"] == BASE_TIME + timedelta(minutes=1)
    assert row["oldest_pending_age"] > timedelta(days=1)


async def test_undelivered_events_of_a_dead_command_are_dead(
    pool: asyncpg.Pool,
) -> None:
    """A parked command's undelivered events count as dead, not pending."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, [1, 2, 3])
    await record_delivery(pool, command_id, 1, 1, BASE_TIME)
    await pool.execute(
        "UPDATE command_delivery SET state = 'dead', last_status = 410, "
        "last_error = 'sink said gone' WHERE command_id = $1",
        command_id,
    )

    row = await command_audit(pool, command_id)

    assert row["pending_events"] == 0
    assert row["dead_events"] == 2
    assert row["oldest_pending_at"] is None
    assert row["dead"] is True
    assert row["last_delivery_status"] == 410
    assert row["last_delivery_error"] == "sink said gone"


async def test_refusals_and_conflicts_are_counted(pool: asyncpg.Pool) -> None:
    """Refused events count per command, conflicts separately."""
    command_id = await new_command(pool)
    runner_id = await pool.fetchval(
        "SELECT runner_id FROM commands WHERE id = $1", command_id
    )
    await pool.executemany(
        "INSERT INTO refused_events (runner_id, command_id, sequence, code, reason) "
        "VALUES ($1, $2, $3, $4, $5)",
        [
            (
                runner_id,
                command_id,
                1,
                "conflict",
                "sequence 1 is stored with another id",
            ),
            (runner_id, command_id, 2, "too_large", "event over 1 MiB"),
        ],
    )

    row = await command_audit(pool, command_id)

    assert row["conflicts_refused"] == 1
    assert row["events_refused"] == 2


async def test_a_failed_verification_is_lost(pool: asyncpg.Pool) -> None:
    """The end-to-end hash not matching marks the command lost."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, [1, 2])
    await record_delivery(pool, command_id, 1, 2, BASE_TIME)
    await finish_command(pool, command_id, verification_matched=False)

    row = await command_audit(pool, command_id)

    assert row["verification_matched"] is False
    assert row["lost"] is True


async def test_a_pruned_command_is_not_lost(pool: asyncpg.Pool) -> None:
    """A command whose events retention removed is marked pruned, never lost."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, [1, 2])
    await finish_command(pool, command_id)
    await pool.execute(
        "INSERT INTO pruned_commands (command_id, highest_sequence, events_removed) "
        "VALUES ($1, 3, 1)",
        command_id,
    )

    row = await command_audit(pool, command_id)

    assert row["pruned_at"] is not None
    assert row["lost"] is False


async def test_runner_view_rolls_up_its_commands(pool: asyncpg.Pool) -> None:
    """Per runner: sums of its commands, lag over all its events, refusals."""
    first = await new_command(pool, "laptop")
    second = await new_command(pool, "laptop")
    idle_runner = await register_runner(pool, "idle")
    runner_id = await pool.fetchval(
        "SELECT runner_id FROM commands WHERE id = $1", first
    )
    await pool.execute(
        "UPDATE runners SET last_seen_at = $2, connected_at = $2 WHERE id = $1",
        runner_id,
        BASE_TIME,
    )

    await store_events(pool, first, [1, 2, 3])
    await record_delivery(pool, first, 1, 3, BASE_TIME + timedelta(seconds=1))
    await store_events(pool, second, [1, 3])
    await record_delivery(pool, second, 1, 1, BASE_TIME + timedelta(seconds=5))
    await finish_command(pool, second)
    await pool.execute(
        "INSERT INTO refused_events (runner_id, code, reason) "
        "VALUES ($1, 'malformed', 'not JSON')",
        runner_id,
    )

    row = await pool.fetchrow(
        "SELECT * FROM audit_runners WHERE runner_id = $1", runner_id
    )
    assert row is not None
    assert row["runner_name"] == "laptop"
    assert row["last_seen_at"] == BASE_TIME
    assert row["connected"] is True
    assert row["commands"] == 2
    assert row["events_stored"] == 5
    assert row["delivered_events"] == 4
    assert row["pending_events"] == 1
    assert row["missing_events"] == 1
    assert row["commands_with_missing"] == 1
    assert row["lost_commands"] == 1
    assert row["events_refused"] == 1
    assert row["conflicts_refused"] == 0
    # Lags are 1, 1, 1 and 5 seconds.
    assert row["lag_p50"] == timedelta(seconds=1)
    assert row["lag_max"] == timedelta(seconds=5)

    idle = await pool.fetchrow(
        "SELECT * FROM audit_runners WHERE runner_id = $1", idle_runner.id
    )
    assert idle is not None
    assert idle["commands"] == 0
    assert idle["events_stored"] == 0
    assert idle["lag_p50"] is None


async def test_system_view_totals_rate_and_queue_depth(pool: asyncpg.Pool) -> None:
    """One row: totals, events stored in the last minute, queue depth."""
    command_id = await new_command(pool)
    now = await pool.fetchval("SELECT now()")
    await store_events(pool, command_id, range(1, 31), now - timedelta(seconds=5))
    await store_events(pool, command_id, range(31, 41), now - timedelta(minutes=5))
    await record_delivery(pool, command_id, 1, 10, now)

    row = await pool.fetchrow("SELECT * FROM audit_system")
    assert row is not None
    assert row["runners"] == 1
    assert row["commands"] == 1
    assert row["events_stored"] == 40
    assert row["delivered_events"] == 10
    assert row["queue_depth"] == 30
    assert row["commands_waiting"] == 1
    assert row["events_last_minute"] == 30
    assert float(row["events_per_minute"]) == pytest.approx(40 / 15, abs=0.05)
    assert row["lag_max_last_hour"] == timedelta(seconds=5)
    assert row["lost_commands"] == 0


async def test_delivery_lag_view_selects_by_delivery_time(pool: asyncpg.Pool) -> None:
    """audit_delivery_lag has one row per delivered event, filterable by day."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 5))
    await record_delivery(pool, command_id, 1, 2, BASE_TIME + timedelta(seconds=2))
    await record_delivery(pool, command_id, 3, 4, BASE_TIME + timedelta(days=1))

    rows = await pool.fetch(
        "SELECT sequence, delivery_lag FROM audit_delivery_lag "
        "WHERE delivered_at >= $1 AND delivered_at < $2 ORDER BY sequence",
        BASE_TIME,
        BASE_TIME + timedelta(hours=1),
    )

    assert [(r["sequence"], r["delivery_lag"]) for r in rows] == [
        (1, timedelta(seconds=2)),
        (2, timedelta(seconds=2)),
    ]


# runledger audit and runledger prune -----------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse like the runledger command line, with only this module registered."""
    parser = argparse.ArgumentParser(prog="runledger")
    audit.register(parser.add_subparsers(required=True))
    return parser.parse_args(argv)


async def run_cli(argv: list[str]) -> int:
    """Run a subcommand's handler as the command line would (its own loop)."""
    args = parse(argv)
    code: int = await asyncio.to_thread(args.handler, args)
    return code


async def healthy_history(pool: asyncpg.Pool) -> uuid.UUID:
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 4))
    await record_delivery(pool, command_id, 1, 3, BASE_TIME + timedelta(seconds=1))
    await finish_command(pool, command_id)
    return command_id


async def test_audit_passes_when_everything_was_delivered(
    pool: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 0 and an OK verdict when nothing is lost, dead or stuck."""
    await healthy_history(pool)

    code = await run_cli(["audit", "--database-url", database_url])

    output = capsys.readouterr()
    assert code == 0
    assert "OK: nothing lost, dead or stuck" in output.out
    assert "laptop" in output.out
    assert "events stored 3, delivered 3" in output.out
    # It says what it checked while it works.
    assert "checking system totals" in output.err
    assert "checking every command" in output.err


async def test_audit_fails_and_names_lost_dead_and_stuck_commands(
    pool: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 1, with each problem command and what is wrong with it."""
    await healthy_history(pool)
    lost = await new_command(pool, "ci")
    await store_events(pool, lost, [1, 2, 5])
    await record_delivery(pool, lost, 1, 5, BASE_TIME + timedelta(seconds=1))
    await finish_command(pool, lost)

    dead = await new_command(pool)
    await store_events(pool, dead, [1])
    await pool.execute(
        "UPDATE command_delivery SET state = 'dead', last_error = 'HTTP 410' "
        "WHERE command_id = $1",
        dead,
    )

    stuck = await new_command(pool)
    now = await pool.fetchval("SELECT now()")
    await store_events(pool, stuck, [1, 2], now - timedelta(minutes=10))

    code = await run_cli(["audit", "--quiet", "--database-url", database_url])

    out = capsys.readouterr().out
    assert code == 1
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "lost" in lines[str(lost)] and "missing 3-4" in lines[str(lost)]
    assert "dead" in lines[str(dead)] and "HTTP 410" in lines[str(dead)]
    assert "stuck" in lines[str(stuck)] and "oldest pending 10 min" in lines[str(stuck)]
    assert (
        "FAILED: 1 command lost events; 1 command dead; 1 command stuck "
        "(events pending, or no answer from the runner) longer than 5 min"
    ) in out


async def test_audit_stuck_threshold_is_a_flag(
    pool: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pending events younger than --stuck-after do not fail the audit."""
    command_id = await new_command(pool)
    now = await pool.fetchval("SELECT now()")
    await store_events(pool, command_id, [1], now - timedelta(minutes=10))

    assert await run_cli(["audit", "--quiet", "--database-url", database_url]) == 1
    relaxed = ["audit", "--quiet", "--stuck-after", "3600", "--database-url"]
    assert await run_cli([*relaxed, database_url]) == 0
    assert "OK" in capsys.readouterr().out


async def test_a_command_its_runner_never_answered_is_stuck(
    pool: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dispatched long ago with no event back fails the audit as stuck."""
    silent = await new_command(pool)
    await pool.execute(
        "UPDATE commands SET status = 'dispatched', "
        "dispatched_at = now() - interval '10 minutes' WHERE id = $1",
        silent,
    )
    just_sent = await new_command(pool)
    await pool.execute(
        "UPDATE commands SET status = 'dispatched', dispatched_at = now() "
        "WHERE id = $1",
        just_sent,
    )

    code = await run_cli(["audit", "--quiet", "--database-url", database_url])

    out = capsys.readouterr().out
    assert code == 1
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "stuck" in lines[str(silent)]
    assert "no event back" in lines[str(silent)]
    assert str(just_sent) not in lines


async def test_audit_json_is_for_scripts(
    pool: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints one document: verdict, counts, figures, problem commands."""
    await healthy_history(pool)
    dead = await new_command(pool)
    await pool.execute(
        "UPDATE command_delivery SET state = 'dead' WHERE command_id = $1", dead
    )

    code = await run_cli(["audit", "--json", "--quiet", "--database-url", database_url])

    document = json.loads(capsys.readouterr().out)
    assert code == 1
    assert document["healthy"] is False
    assert document["dead_commands"] == 1
    assert document["lost_commands"] == 0
    assert document["stuck_after_seconds"] == 300.0
    assert document["system"]["events_stored"] == 3
    assert document["runners"][0]["runner_name"] == "laptop"
    assert document["runners"][0]["lag_p50"] == 1.0
    assert [c["command_id"] for c in document["problem_commands"]] == [str(dead)]


async def test_prune_removes_old_delivered_commands_and_reports(
    pool: asyncpg.Pool, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """prune --dry-run removes nothing; prune removes and says how much."""
    command_id = await healthy_history(pool)
    base = ["prune", "--retention-days", "1", "--database-url", database_url]

    assert await run_cli([*base, "--dry-run"]) == 0
    dry = capsys.readouterr()
    assert "would prune 1 of 1 commands" in dry.out
    assert f"would prune {command_id}" in dry.err
    assert await pool.fetchval("SELECT count(*) FROM events") == 3

    assert await run_cli([*base, "--batch-size", "2"]) == 0
    real = capsys.readouterr()
    assert "pruned 1 of 1 commands" in real.out
    assert "removed 3 events, 1 deliveries" in real.out
    assert "batches of at most 2 rows" in real.out
    assert f"pruned {command_id}: 3 events, 1 deliveries" in real.err
    assert await pool.fetchval("SELECT count(*) FROM events") == 0


def test_durations_read_naturally() -> None:
    """Durations print in the unit a person would use."""
    assert audit.format_duration(None) == "-"
    assert audit.format_duration(timedelta(milliseconds=350)) == "350 ms"
    assert audit.format_duration(timedelta(seconds=4.25)) == "4.2 s"
    assert audit.format_duration(timedelta(minutes=12, seconds=10)) == "12 min"
    assert audit.format_duration(timedelta(hours=3, minutes=5)) == "3 h 5 min"
    assert audit.format_duration(timedelta(days=2, hours=12)) == "2.5 d"


def test_tables_align_text_left_and_figures_right() -> None:
    """render_table pads each column to its widest cell."""
    lines = audit.render_table(
        ("NAME", "EVENTS"), [("a", "1"), ("long", "1,000")], "lr"
    )
    assert lines == ["  NAME  EVENTS", "  a          1", "  long   1,000"]


async def test_audit_on_a_schema_without_the_views_says_to_migrate(
    database_url: str,
) -> None:
    """An old schema is a DatabaseError that names runledger migrate."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("DROP VIEW audit_system")
    finally:
        await connection.close()

    with pytest.raises(DatabaseError, match="runledger migrate"):
        await run_cli(["audit", "--quiet", "--database-url", database_url])


# Against the real relay -------------------------------------------------------


async def test_the_audit_follows_a_real_relay_through_a_skipped_gap(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """Rows the relay writes give the audit's figures: a skipped gap is lost and
    its neighbours delivered; once the late events arrive, nothing is lost."""
    command_id = await new_command(pool)
    await relay_harness.store_events(pool, command_id, [1, 2, 3, 6, 7, 8], exit_at=8)

    async with (
        relay_harness.running_sink() as sink,
        relay_harness.running_relay(database_url, sink, relay_gap_hold=0.5),
    ):
        # The sink applies before the relay records the delivery; wait for
        # the record, which is what the audit reads.
        deadline = asyncio.get_running_loop().time() + 30
        while (await command_audit(pool, command_id))["delivered_events"] < 6:
            assert asyncio.get_running_loop().time() < deadline, len(sink.applied)
            await asyncio.sleep(0.05)
        skipped = await command_audit(pool, command_id)
        assert skipped["missing_ranges"] == "4-5"
        assert skipped["gaps_skipped"] == 1
        assert skipped["delivered_events"] == 6
        assert skipped["pending_events"] == 0
        assert skipped["lost"] is True

        await relay_harness.store_events(pool, command_id, [4, 5])
        await relay_harness.wait_for_state(pool, command_id, "finished")

    filled = await command_audit(pool, command_id)
    assert filled["events_stored"] == 8
    assert filled["delivered_events"] == 8
    assert filled["pending_events"] == 0
    assert filled["missing_events"] == 0
    assert filled["lost"] is False
    assert filled["lag_max"] is not None


async def test_the_audit_reports_a_command_the_relay_parked_dead(
    database_url: str, pool: asyncpg.Pool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sink that refuses every delivery leaves the command dead, and
    runledger audit fails naming it."""
    command_id = await new_command(pool)
    await relay_harness.store_events(pool, command_id, range(1, 3))
    async with (
        relay_harness.running_sink() as sink,
        relay_harness.running_relay(database_url, sink, signing_secret="another"),
    ):
        await relay_harness.wait_for_state(pool, command_id, "dead")

    code = await run_cli(["audit", "--quiet", "--database-url", database_url])

    out = capsys.readouterr().out
    assert code == 1
    assert str(command_id) in out
    assert "signature does not match" in out
    row = await command_audit(pool, command_id)
    assert (row["dead"], row["dead_events"], row["pending_events"]) == (True, 2, 0)
