"""Revisions upgrade and downgrade along every path, match the models, and
leave ingest running while they work."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import re
import time
import uuid
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from core.migrate import alembic_config, upgrade
from core.tables import metadata
from migrations.online import LOCK_TIMEOUT_VARIABLE
from tests.conftest import PostgresServer

_database_numbers = itertools.count(1)


def _revisions() -> list[str]:
    """Every revision id, oldest first."""
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused/x"))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


@contextlib.contextmanager
def _empty_database(server: PostgresServer) -> Iterator[str]:
    name = f"runledger_safety_{os.getpid()}_{next(_database_numbers)}"
    janitor = server.janitor(name)
    janitor.init()
    try:
        yield server.url(name)
    finally:
        janitor.drop()


def _downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def _current_revision(url: str) -> str | None:
    with psycopg.connect(url) as connection:
        exists = connection.execute(
            "SELECT to_regclass('alembic_version') IS NOT NULL"
        ).fetchone()
        if not exists or not exists[0]:
            return None
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        return None if row is None else str(row[0])


def _relations(url: str) -> set[str]:
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v', 'i')"
        ).fetchall()
    return {str(row[0]) for row in rows}


def test_there_is_a_revision_after_the_initial_schema() -> None:
    """The revision chain is linear and starts with 0001."""
    revisions = _revisions()
    assert revisions[0] == "0001"
    assert len(revisions) >= 2
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused/x"))
    assert len(script.get_heads()) == 1


@pytest.mark.slow
def test_every_revision_upgrades_from_every_earlier_one_and_back(
    postgres_server: PostgresServer,
) -> None:
    """From empty and from each revision, every later one upgrades and downgrades."""
    revisions = _revisions()
    starts: list[str | None] = [None, *revisions]

    for start_index, start in enumerate(starts):
        for target in revisions[start_index:]:
            with _empty_database(postgres_server) as url:
                if start is not None:
                    upgrade(url, start)
                upgrade(url, target)
                assert _current_revision(url) == target

                _downgrade(url, start or "base")
                assert _current_revision(url) == start


def test_downgrade_to_base_leaves_nothing_behind(
    postgres_server: PostgresServer,
) -> None:
    """Downgrading head to base removes every table, view and index."""
    with _empty_database(postgres_server) as url:
        upgrade(url)
        _downgrade(url, "base")
        assert _relations(url) <= {"alembic_version", "alembic_version_pkc"}

        # And the chain comes back up cleanly afterwards.
        upgrade(url)
        assert _current_revision(url) == _revisions()[-1]


def test_models_and_migrated_schema_agree(database_url: str) -> None:
    """Columns, types, nullability, defaults and constraints match core.tables."""
    engine = sa.create_engine("postgresql+psycopg://" + database_url.split("://", 1)[1])
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={"compare_type": True, "compare_server_default": True},
            )
            differences = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    assert differences == []


def _normalised_predicate(predicate: str | None) -> str | None:
    if predicate is None:
        return None
    without_casts = re.sub(r"::[a-z ]+", "", predicate)
    return re.sub(r"[()\s]", "", without_casts)


async def test_models_and_migrated_indexes_agree(pool: asyncpg.Pool) -> None:
    """Every index in core.tables exists with its method, columns and predicate."""
    rows = await pool.fetch(
        """
        SELECT
            t.relname AS table_name,
            i.relname AS index_name,
            am.amname AS method,
            x.indisunique AS is_unique,
            pg_get_expr(x.indpred, x.indrelid) AS predicate,
            array(
                SELECT a.attname
                FROM unnest(x.indkey) WITH ORDINALITY AS k(attnum, position)
                JOIN pg_attribute a
                  ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                ORDER BY k.position
            ) AS columns
        FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace
        JOIN pg_am am ON am.oid = i.relam
        WHERE n.nspname = 'public'
          AND t.relname <> 'alembic_version'
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
        """
    )
    migrated = {
        (
            row["table_name"],
            row["index_name"],
            row["method"],
            bool(row["is_unique"]),
            tuple(row["columns"]),
            _normalised_predicate(row["predicate"]),
        )
        for row in rows
    }

    modelled = set()
    for table in metadata.sorted_tables:
        for index in table.indexes:
            predicate = index.dialect_options["postgresql"]["where"]
            modelled.add(
                (
                    table.name,
                    index.name,
                    index.dialect_options["postgresql"]["using"] or "btree",
                    bool(index.unique),
                    tuple(column.name for column in index.columns),
                    _normalised_predicate(
                        None if predicate is None else str(predicate)
                    ),
                )
            )
    assert migrated == modelled


def _offline_sql(from_revision: str, to_revision: str) -> str:
    config = alembic_config("postgresql://offline@127.0.0.1/unused")
    buffer = io.StringIO()
    config.output_buffer = buffer
    command.upgrade(config, f"{from_revision}:{to_revision}", sql=True)
    return buffer.getvalue()


def test_later_revisions_bound_locks_and_build_indexes_concurrently() -> None:
    """After the initial schema, every index is built concurrently under a lock
    timeout, and each transaction sets a lock timeout before its first DDL."""
    revisions = _revisions()
    for previous, revision in itertools.pairwise(revisions):
        statements = [
            s.strip()
            for s in _offline_sql(previous, revision).split(";\n")
            if s.strip()
        ]

        session_bounded = transaction_bounded = False
        for statement in statements:
            first_line = next(
                line.strip().upper()
                for line in statement.splitlines()
                if line.strip() and not line.strip().startswith("--")
            )
            if first_line in ("BEGIN", "COMMIT"):
                transaction_bounded = False
            elif first_line.startswith("SET LOCAL LOCK_TIMEOUT"):
                transaction_bounded = True
            elif first_line.startswith("SET LOCK_TIMEOUT"):
                session_bounded = True
            elif first_line.startswith("RESET LOCK_TIMEOUT"):
                session_bounded = False
            elif not first_line.startswith("UPDATE ALEMBIC_VERSION"):
                assert session_bounded or transaction_bounded, (
                    f"{revision}: no lock timeout before {first_line}"
                )
                if (
                    first_line.startswith(("CREATE", "DROP"))
                    and " INDEX " in first_line
                ):
                    assert "CONCURRENTLY" in first_line, f"{revision}: {first_line}"


async def _write_events(
    url: str,
    command_id: uuid.UUID,
    stop: asyncio.Event,
    latencies: list[float],
) -> None:
    """Insert one event per short transaction, as the broker's writer does."""
    connection = await asyncpg.connect(url)
    try:
        sequence = 1000
        while not stop.is_set():
            sequence += 1
            started = time.monotonic()
            await connection.execute(
                "INSERT INTO events (command_id, sequence, id, kind) "
                "VALUES ($1, $2, $3, 'output')",
                command_id,
                sequence,
                uuid.uuid4(),
            )
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.005)
    finally:
        await connection.close()


@pytest.mark.slow
async def test_upgrade_during_ingest_does_not_stall_writers(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a long transaction open on events, writers keep committing while the
    upgrade waits, and the upgrade completes once that transaction ends."""
    lock_timeout_seconds = 1.0
    monkeypatch.setenv(LOCK_TIMEOUT_VARIABLE, str(lock_timeout_seconds))

    with _empty_database(postgres_server) as url:
        await asyncio.to_thread(upgrade, url, "0001")
        setup = await asyncpg.connect(url)
        try:
            runner_id = await setup.fetchval(
                "INSERT INTO runners (name, token_hash) VALUES ('r', 'h') RETURNING id"
            )
            command_ids = [
                await setup.fetchval(
                    "INSERT INTO commands (runner_id, argv) "
                    "VALUES ($1, '[]') RETURNING id",
                    runner_id,
                )
                for _ in range(3)
            ]
        finally:
            await setup.close()

        # A transaction that wrote an event and stays open: a concurrent index
        # build on events must wait for it, and may not hold writers meanwhile.
        blocker = await asyncpg.connect(url)
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute(
            "INSERT INTO events (command_id, sequence, id, kind) "
            "VALUES ($1, 1, $2, 'output')",
            command_ids[0],
            uuid.uuid4(),
        )

        stop = asyncio.Event()
        latencies: list[float] = []
        writers = [
            asyncio.create_task(_write_events(url, command_id, stop, latencies))
            for command_id in command_ids[1:]
        ]
        try:
            migration = asyncio.create_task(asyncio.to_thread(upgrade, url, "head"))

            # Hold the blocker longer than one lock timeout, so the upgrade has
            # to wait (and retry) while the writers carry on.
            await asyncio.sleep(lock_timeout_seconds * 2.5)
            written_while_blocked = len(latencies)
            upgrade_waited_for_blocker = not migration.done()
            await blocking.commit()

            await asyncio.wait_for(migration, timeout=120)
        finally:
            stop.set()
            await asyncio.gather(*writers)
            await blocker.close()

        assert _current_revision(url) == _revisions()[-1]
        assert upgrade_waited_for_blocker
        assert written_while_blocked > 10
        # No writer waited on the migration for longer than its lock timeout
        # (plus slack for a busy machine).
        assert max(latencies) < lock_timeout_seconds + 1.0, max(latencies)


@pytest.mark.slow
async def test_an_upgrade_blocked_too_long_fails_cleanly_and_can_be_rerun(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a transaction outlasts every retry, the upgrade stops with the lock
    error at the previous revision; rerun afterwards, it completes."""
    monkeypatch.setenv(LOCK_TIMEOUT_VARIABLE, "0.2")

    with _empty_database(postgres_server) as url:
        await asyncio.to_thread(upgrade, url, "0001")
        blocker = await asyncpg.connect(url)
        try:
            # An open transaction that wrote to events: an index on events
            # cannot be built until it ends.
            blocking = blocker.transaction()
            await blocking.start()
            await blocker.execute(
                "INSERT INTO events (command_id, sequence, id, kind) "
                "VALUES ($1, 1, $2, 'output')",
                uuid.uuid4(),
                uuid.uuid4(),
            )

            with pytest.raises(sa.exc.DBAPIError) as raised:
                await asyncio.to_thread(upgrade, url, "head")
            assert getattr(raised.value.orig, "sqlstate", None) == "55P03"
            assert _current_revision(url) == "0001"
            await blocking.rollback()
        finally:
            await blocker.close()

        await asyncio.to_thread(upgrade, url, "head")
        assert _current_revision(url) == _revisions()[-1]
        with psycopg.connect(url) as connection:
            invalid = connection.execute(
                "SELECT count(*) FROM pg_index WHERE NOT indisvalid"
            ).fetchone()
        assert invalid == (0,)
