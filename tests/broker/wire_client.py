"""A small runner-side WebSocket client that drives the broker in tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from core import wire

DEADLINE_SECONDS = 30.0
POLL_SECONDS = 0.05


async def poll_until(
    condition: Callable[[], Awaitable[bool]], seconds: float = DEADLINE_SECONDS
) -> None:
    """Wait until ``condition()`` holds; TimeoutError after ``seconds``."""
    async with asyncio.timeout(seconds):
        for _ in itertools.count():
            if await condition():
                return
            await asyncio.sleep(POLL_SECONDS)


def output_event(
    command_id: uuid.UUID,
    sequence: int | None,
    data: bytes,
    *,
    event_id: uuid.UUID | None = None,
    stream: str = "stdout",
) -> wire.WireEvent:
    """An output event with a fresh id unless one is given."""
    return wire.WireEvent(
        command_id=command_id,
        kind="output",
        id=event_id if event_id is not None else uuid.uuid4(),
        sequence=sequence,
        stream=stream,
        data=data,
    )


@dataclass
class WireRunner:
    """One connection to the broker, as a runner holds it."""

    connection: ClientConnection
    hello: wire.Hello
    acknowledged: dict[tuple[uuid.UUID, int], uuid.UUID] = field(default_factory=dict)
    acknowledgements: list[wire.Acknowledged] = field(default_factory=list)
    refused: list[wire.Refused] = field(default_factory=list)
    errors: list[wire.ErrorMessage] = field(default_factory=list)
    commands: list[wire.CommandMessage] = field(default_factory=list)
    cancels: list[wire.CancelMessage] = field(default_factory=list)

    @classmethod
    async def connect(
        cls, url: str, token: str, *, ssl_context: ssl.SSLContext | None = None
    ) -> WireRunner:
        """Connect with ``token`` and read the hello."""
        connection = await connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            ssl=ssl_context,
            max_size=None,
            open_timeout=DEADLINE_SECONDS,
        )
        first = wire.broker_message_decoder.decode(
            await asyncio.wait_for(connection.recv(), DEADLINE_SECONDS)
        )
        assert isinstance(first, wire.Hello), first
        return cls(connection, first)

    async def send(self, message: msgspec.Struct) -> None:
        """Send one wire message."""
        await self.connection.send(wire.encode(message).decode())

    async def send_raw(self, frame: str | bytes) -> None:
        """Send a frame as it is, to test what the broker makes of it."""
        await self.connection.send(frame)

    async def send_events(self, events: list[wire.WireEvent]) -> None:
        """Send one ``events`` batch."""
        await self.send(wire.EventsMessage(events=events))

    async def receive(self) -> Any:
        """The next message from the broker, recorded by its kind."""
        frame = await asyncio.wait_for(self.connection.recv(), DEADLINE_SECONDS)
        message = wire.broker_message_decoder.decode(frame)
        if isinstance(message, wire.EventAck):
            self.acknowledgements.extend(message.acknowledged)
            for acknowledged in message.acknowledged:
                self.acknowledged[(acknowledged.command_id, acknowledged.sequence)] = (
                    acknowledged.id
                )
            self.refused.extend(message.refused)
        elif isinstance(message, wire.ErrorMessage):
            self.errors.append(message)
        elif isinstance(message, wire.CommandMessage):
            self.commands.append(message)
        elif isinstance(message, wire.CancelMessage):
            self.cancels.append(message)
        return message

    async def receive_until(self, done: Any) -> None:
        """Read messages until ``done(self)`` holds (bounded by a deadline)."""
        async with asyncio.timeout(DEADLINE_SECONDS):
            while not done(self):
                await self.receive()

    async def wait_settled(self, events: list[wire.WireEvent]) -> None:
        """Read until every event of ``events`` is acknowledged or refused."""
        wanted = {event.id for event in events}

        def settled(runner: WireRunner) -> bool:
            answered: set[uuid.UUID | None] = set(runner.acknowledged.values())
            answered |= {refused.id for refused in runner.refused}
            return wanted <= answered

        await self.receive_until(settled)

    async def wait_closed(self) -> None:
        """Read until the broker closes the connection (bounded by a deadline)."""
        async with asyncio.timeout(DEADLINE_SECONDS):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await self.receive()

    async def close(self) -> None:
        """Close the connection normally."""
        await self.connection.close()
