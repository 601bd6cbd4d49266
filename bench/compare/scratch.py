"""Scratch databases on the machine's Postgres, migrated, and always dropped.

The server is the local one (``127.0.0.1:5432``, user ``postgres``) unless
``BENCH_POSTGRES_URL`` names another; each scratch database is created from
nothing, migrated with the project's alembic revisions, and dropped with
``WITH (FORCE)`` when the scenario ends, even on error.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from bench.scratch import create_database, drop_database

SERVER_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PREFIX = "runledger_compare_"
_numbers = itertools.count(1)


@asynccontextmanager
async def scratch_database(
    label: str, server_url: str = SERVER_URL
) -> AsyncIterator[tuple[str, str]]:
    """Yield (name, url) of a fresh migrated database; drop it afterwards."""
    name = f"{PREFIX}{os.getpid()}_{next(_numbers)}_{label}"
    url = await create_database(server_url, name)
    try:
        yield name, url
    finally:
        await drop_database(server_url, name)


async def drop_leftovers(server_url: str = SERVER_URL) -> list[str]:
    """Drop scratch databases of benchmark processes that no longer run."""
    connection = await asyncpg.connect(server_url)
    try:
        names = [
            record["datname"]
            for record in await connection.fetch(
                "SELECT datname FROM pg_database WHERE starts_with(datname, $1)",
                PREFIX,
            )
        ]
    finally:
        await connection.close()

    dropped = []
    for name in names:
        # Only databases named by this module, whose process has ended.
        pid_text = name[len(PREFIX) :].split("_", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        await drop_database(server_url, name)
        dropped.append(name)
    return dropped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
