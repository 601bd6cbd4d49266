"""Scratch databases for the benchmarks: created, migrated, dropped.

Every benchmark works in a database of its own on the server it is pointed
at, created from nothing, migrated with the project's alembic revisions, and
dropped with ``WITH (FORCE)`` when it ends.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlparse, urlunparse

import asyncpg

from core.migrate import upgrade


def database_url(name: str, server_url: str) -> str:
    """The URL of database ``name`` on the server of ``server_url``."""
    return urlunparse(urlparse(server_url)._replace(path="/" + name))


async def execute_on_server(server_url: str, statement: str) -> None:
    """Run one statement (CREATE or DROP DATABASE) on its own connection."""
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` and migrate it to head; return its URL.

    A database whose migration fails is dropped again before the error rises.
    """
    await execute_on_server(server_url, f'CREATE DATABASE "{name}"')
    url = database_url(name, server_url)
    try:
        # alembic runs its own event loop, so it gets a thread of its own.
        await asyncio.to_thread(upgrade, url)
    except BaseException:
        await drop_database(server_url, name)
        raise
    return url


async def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, ending its sessions."""
    await execute_on_server(
        server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    )
