"""Broker fixtures: a running BrokerServer on port 0 over the test's database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from broker.server import BrokerServer
from broker.settings import BrokerSettings
from tests.conftest import create_command, register_runner

StartBroker = Callable[..., Awaitable[BrokerServer]]


@pytest.fixture
async def start_broker(database_url: str) -> AsyncIterator[StartBroker]:
    """Start brokers with setting overrides; all are stopped after the test."""
    started: list[BrokerServer] = []

    async def start(*, relay_settings: Any = None, **overrides: Any) -> BrokerServer:
        settings = BrokerSettings(**{"port": 0, **overrides})
        broker = BrokerServer(settings, database_url, relay_settings=relay_settings)
        await broker.start()
        started.append(broker)
        return broker

    try:
        yield start
    finally:
        for broker in reversed(started):
            await broker.stop()


@pytest.fixture
async def broker(start_broker: StartBroker) -> BrokerServer:
    """One broker with the default settings."""
    return await start_broker()


@dataclass(frozen=True)
class RunnerWithCommand:
    """A registered runner, its token, and one queued command of it."""

    id: uuid.UUID
    token: str
    command_id: uuid.UUID


@pytest.fixture
async def alpha(pool: asyncpg.Pool) -> RunnerWithCommand:
    """Runner "alpha" with one queued command."""
    registered = await register_runner(pool, "alpha")
    command_id = await create_command(pool, registered.id, ["true"])
    return RunnerWithCommand(registered.id, registered.token, command_id)
