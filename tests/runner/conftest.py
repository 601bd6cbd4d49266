"""A broker stand-in that speaks core/wire.py, for the runner's unit tests.

The wire protocol is runledger's own seam, so the runner's own behaviour
(windowing, resending, refusals, reconnects) is pinned here against a small
server whose answers the test controls. Tests against the real broker and
Postgres live in ``test_faults.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from core import wire
from core.settings import load_settings
from runner.daemon import Runner
from runner.settings import RunnerSettings
from tests.runner.stack import BrokerProcess, free_port

STAND_IN_TOKEN = "rlr_stand-in-token"

Refusal = Callable[[wire.WireEvent], tuple[str, str] | None]


@dataclass
class StandInBroker:
    """Records the events it gets and answers as the test says."""

    limits: wire.Limits = field(
        default_factory=lambda: wire.Limits(
            max_frame_bytes=1024 * 1024,
            max_batch_events=200,
            max_event_bytes=256 * 1024,
        )
    )
    acknowledging: bool = True
    saying_hello: bool = True
    refusing_frames: int = 0
    refuse: Refusal | None = None
    stored: dict[tuple[uuid.UUID, int], wire.WireEvent] = field(default_factory=dict)
    received_events: int = 0
    frames: list[int] = field(default_factory=list)
    connections: int = 0
    authorization_headers: list[str | None] = field(default_factory=list)
    server: Server | None = None
    current: ServerConnection | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    tls: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{port}"

    async def start(self, port: int = 0) -> None:
        self.server = await serve(
            self._session,
            "127.0.0.1",
            port,
            process_request=self._check_token,
            max_size=None,
            ssl=self.tls,
        )

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def _check_token(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        header = request.headers.get("Authorization")
        self.authorization_headers.append(header)
        if header != f"Bearer {STAND_IN_TOKEN}":
            return connection.respond(401, "unknown token\n")
        return None

    async def _session(self, connection: ServerConnection) -> None:
        self.connections += 1
        self.current = connection
        if self.saying_hello:
            await connection.send(
                wire.encode(
                    wire.Hello(
                        runner_id=uuid.uuid4(),
                        runner_name="stand-in",
                        connection_epoch=self.connections,
                        limits=self.limits,
                    )
                ).decode()
            )
        self._notify()
        with contextlib.suppress(Exception):
            async for raw in connection:
                await self._take(connection, raw)

    async def _take(self, connection: ServerConnection, raw: str | bytes) -> None:
        size = len(raw)
        self.frames.append(size)
        if size > self.limits.max_frame_bytes:
            await connection.send(
                wire.encode(wire.ErrorMessage("frame_too_large", "too big")).decode()
            )
            return
        message = wire.runner_message_decoder.decode(raw)
        if not isinstance(message, wire.EventsMessage):
            return
        if self.refusing_frames > 0:
            self.refusing_frames -= 1
            await connection.send(
                wire.encode(wire.ErrorMessage("rate_limited", "slow down")).decode()
            )
            self._notify()
            return
        assert len(message.events) <= self.limits.max_batch_events

        acknowledged, refused = [], []
        for event in message.events:
            self.received_events += 1
            assert event.id is not None and event.sequence is not None
            refusal = self.refuse(event) if self.refuse else None
            if refusal is not None:
                refused.append(
                    wire.Refused(
                        refusal[0],
                        refusal[1],
                        event.id,
                        event.command_id,
                        event.sequence,
                    )
                )
                continue
            key = (event.command_id, event.sequence)
            known = self.stored.setdefault(key, event)
            assert known.id == event.id and known.data == event.data
            acknowledged.append(
                wire.Acknowledged(event.id, event.command_id, event.sequence)
            )
        if self.acknowledging:
            await connection.send(
                wire.encode(wire.EventAck(acknowledged, refused)).decode()
            )
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def send(self, message: msgspec.Struct) -> None:
        """Send a broker message to the connected runner."""
        assert self.current is not None
        await self.current.send(wire.encode(message).decode())

    async def wait_for(self, condition: Callable[[], bool], within: float = 30) -> None:
        """Wait until ``condition()`` holds, re-checking on every change."""
        async with asyncio.timeout(within):
            while not condition():
                changed = self.changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 0.2)

    def events_of(self, command_id: uuid.UUID) -> list[wire.WireEvent]:
        """Stored events of a command in sequence order."""
        found = [e for (c, _), e in self.stored.items() if c == command_id]
        return sorted(found, key=lambda event: event.sequence or 0)

    def output_of(self, command_id: uuid.UUID, stream: str) -> bytes:
        """A stream's stored bytes, joined in sequence order."""
        return b"".join(
            e.data for e in self.events_of(command_id) if e.stream == stream
        )

    def exit_of(self, command_id: uuid.UUID) -> dict[str, Any] | None:
        """The payload of a command's exit event, if stored."""
        for event in self.events_of(command_id):
            if event.kind == "exit":
                return event.payload
        return None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def runner_settings(
    broker: StandInBroker, spool: Path, **overrides: Any
) -> RunnerSettings:
    """Settings for a runner of the stand-in broker, quick to time out and retry."""
    values: dict[str, Any] = {
        "broker_url": broker.url,
        "token": STAND_IN_TOKEN,
        "spool_path": spool,
        "acknowledge_timeout": 1.0,
        "acknowledge_timeout_max": 2.0,
        "reconnect_initial": 0.1,
        "reconnect_max": 0.5,
        "ping_interval": 1.0,
        "ping_timeout": 2.0,
        "cancel_grace": 2.0,
        "stop_flush_seconds": 2.0,
        "compression": False,
    }
    values.update(overrides)
    return load_settings(RunnerSettings, values, environ={})


@pytest.fixture
def broker_process(database_url: str, tmp_path: Path) -> Iterator[BrokerProcess]:
    """A real broker process on a fixed free port; killed after the test."""
    process = BrokerProcess(database_url, free_port(), tmp_path / "broker.log")
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
async def broker() -> AsyncIterator[StandInBroker]:
    """A running stand-in broker on a free port."""
    stand_in = StandInBroker()
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await stand_in.stop()


@pytest.fixture
async def runner(broker: StandInBroker, tmp_path: Path) -> AsyncIterator[Runner]:
    """A started runner connected to the stand-in broker."""
    started = Runner(runner_settings(broker, tmp_path / "spool.sqlite3"))
    await started.start()
    try:
        async with asyncio.timeout(10):
            await started.wait_connected()
        yield started
    finally:
        await started.stop()
