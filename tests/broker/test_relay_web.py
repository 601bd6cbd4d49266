"""The relay against the real sink: the web tier's signed ingest endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from broker.relay import Relay, RelaySettings
from tests.broker.relay_harness import SECRET, new_command, store_events
from web.server import WebServer
from web.settings import WebSettings


@contextlib.asynccontextmanager
async def running_web(database_url: str) -> AsyncIterator[WebServer]:
    """The web tier on a free port, verifying with the relay's secret."""
    web = WebServer(
        WebSettings(port=0, signing_secret=SECRET, api_token="rla_relay-tests"),
        database_url,
    )
    await web.start()
    try:
        yield web
    finally:
        await web.stop()


async def wait_for_summary(
    pool: asyncpg.Pool, command_id: uuid.UUID, status: str, applied_through: int
) -> asyncpg.Record:
    """Poll the web tier's projection until the command shows what was delivered."""
    deadline = time.monotonic() + 30
    while True:
        row = await pool.fetchrow(
            "SELECT status, exit_code, applied_through FROM commands WHERE id = $1",
            command_id,
        )
        assert row is not None
        if row["status"] == status and row["applied_through"] == applied_through:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"the web tier shows {dict(row)}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("single_event_mode", [False, True])
async def test_the_web_tier_applies_every_delivery(
    database_url: str, pool: asyncpg.Pool, single_event_mode: bool
) -> None:
    """Batched or one by one, the web tier accepts the relay's signed deliveries
    and its command summary ends with the exit event; the relay finishes."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 31), exit_at=30)

    async with running_web(database_url) as web:
        relay = Relay(
            RelaySettings(
                sink_url=f"{web.url}/api/runner/events",
                signing_secret=SECRET,
                relay_batch_max_events=8,
                relay_single_event_mode=single_event_mode,
            ),
            database_url,
        )
        await relay.start()
        try:
            summary = await wait_for_summary(pool, command_id, "succeeded", 30)
        finally:
            await relay.stop()

    assert summary["exit_code"] == 0
    state = await pool.fetchrow(
        "SELECT state, delivered_through, last_error FROM command_delivery "
        "WHERE command_id = $1",
        command_id,
    )
    assert dict(state) == {
        "state": "finished",
        "delivered_through": 30,
        "last_error": None,
    }
    applied = await pool.fetchval(
        "SELECT count(*) FROM applied_deliveries WHERE command_id = $1", command_id
    )
    assert applied == (30 if single_event_mode else 4)
