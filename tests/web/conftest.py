"""Fixtures of the web tier's tests: a served app on port 0 and event inserts.

Events are inserted with plain SQL here, as the broker would store them, so
the web tier is tested on its own.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from core.commands import EVENTS_CHANNEL
from tests.conftest import create_command, register_runner
from web.server import WebServer
from web.settings import WebSettings

SIGNING_SECRET = "test-signing-secret"
API_TOKEN = "rla_test-api-token"


@pytest.fixture
def web_settings() -> WebSettings:
    """Settings for a test server: port 0, known secrets, short waits."""
    return WebSettings(
        port=0,
        signing_secret=SIGNING_SECRET,
        api_token=API_TOKEN,
        long_poll_max_seconds=10.0,
        graceful_shutdown_seconds=2.0,
    )


@pytest.fixture
async def web_server(
    web_settings: WebSettings, database_url: str
) -> AsyncIterator[WebServer]:
    """A running web tier on this test's database."""
    server = WebServer(web_settings, database_url)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client(web_server: WebServer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the test server."""
    async with httpx.AsyncClient(base_url=web_server.url, timeout=30) as http:
        yield http


@dataclass(frozen=True)
class StoredCommand:
    """A runner and one of its commands, as rows."""

    runner_id: uuid.UUID
    runner_name: str
    command_id: uuid.UUID


@pytest.fixture
async def stored_command(pool: asyncpg.Pool) -> StoredCommand:
    """A runner named ``laptop`` with one queued command."""
    runner = await register_runner(pool, "laptop")
    command_id = await create_command(pool, runner.id, ["make", "test"])
    return StoredCommand(runner.id, runner.name, command_id)


async def insert_event(
    connection: asyncpg.Connection | asyncpg.Pool,
    command_id: uuid.UUID,
    sequence: int,
    kind: str = "output",
    stream: str | None = "stdout",
    data: bytes = b"",
    payload: dict[str, object] | None = None,
    notify: bool = True,
) -> uuid.UUID:
    """Store one event as the broker does, with its NOTIFY."""
    event_id = uuid.uuid4()
    await connection.execute(
        "INSERT INTO events (command_id, sequence, id, kind, stream, data, payload,"
        " emitted_at) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, now())",
        command_id,
        sequence,
        event_id,
        kind,
        stream if kind == "output" else None,
        data,
        json.dumps(payload) if payload is not None else None,
    )
    if notify:
        await connection.execute(
            "SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(command_id)
        )
    return event_id


def exit_payload(
    stdout: bytes, stderr: bytes, status: str = "succeeded", exit_code: int = 0
) -> dict[str, object]:
    """The exit event payload a runner sends for these outputs."""
    return {
        "status": status,
        "exit_code": exit_code,
        "reason": None,
        "streams": {
            "stdout": {
                "bytes": len(stdout),
                "sha256": hashlib.sha256(stdout).hexdigest(),
            },
            "stderr": {
                "bytes": len(stderr),
                "sha256": hashlib.sha256(stderr).hexdigest(),
            },
        },
    }


async def store_run(
    pool: asyncpg.Pool,
    command_id: uuid.UUID,
    chunks: Sequence[tuple[str, bytes]],
    exit_code: int = 0,
) -> int:
    """Store a whole run (status, output chunks, exit); the last sequence."""
    await insert_event(
        pool, command_id, 1, kind="status", payload={"status": "running", "pid": 42}
    )
    sequence = 1
    for stream, data in chunks:
        sequence += 1
        await insert_event(pool, command_id, sequence, stream=stream, data=data)
    stdout = b"".join(data for stream, data in chunks if stream == "stdout")
    stderr = b"".join(data for stream, data in chunks if stream == "stderr")
    sequence += 1
    status = "succeeded" if exit_code == 0 else "failed"
    await insert_event(
        pool,
        command_id,
        sequence,
        kind="exit",
        payload=exit_payload(stdout, stderr, status, exit_code),
    )
    return sequence


@pytest.fixture
async def browser_page() -> AsyncIterator[Any]:
    """A fresh chromium page (see tests/web/browser.py); skips without chromium."""
    from tests.web.browser import CHROMIUM, open_browser_page

    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium")
    async for page in open_browser_page():
        yield page
