"""Runners and commands for the runledger scenarios, and a runner's link.

:func:`prepare_fleet` registers ``runners`` runners with fresh tokens and
stores the workload's commands, dealt round-robin to them and already
running (so the broker has nothing to dispatch). :class:`WireRunner` is the
load generator: it speaks ``core/wire.py`` exactly as the runner's link does
(``Authorization: Bearer`` upgrade, ``hello``, ``events`` frames built by
``runner.connection.frame_of`` below the broker's limits, at most
``window_events`` unacknowledged), but takes its events from memory instead
of the SQLite spool, so what it measures is the broker and Postgres.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

import asyncpg
import msgspec
from websockets.asyncio.client import ClientConnection, connect

from bench.compare.measure import BenchEvent, Workload
from core import wire
from core.tokens import hash_token, new_token
from runner.connection import frame_of

RUNNER_WINDOW_EVENTS = 2000
_encoder = msgspec.json.Encoder()


@dataclass
class FleetRunner:
    """One registered runner, its token and the events it will send."""

    name: str
    token: str
    events: list[BenchEvent] = field(default_factory=list)


async def prepare_fleet(
    url: str, workload: Workload, runners: int
) -> list[FleetRunner]:
    """Register runners, store their running commands; deal out the events."""
    fleet = [FleetRunner(f"bench-{index}", new_token()) for index in range(runners)]
    commands = workload.command_ids()
    owner_of = {command: index % runners for index, command in enumerate(commands)}
    connection = await asyncpg.connect(url)
    try:
        async with connection.transaction():
            runner_ids = [
                await connection.fetchval(
                    "INSERT INTO runners (name, token_hash) VALUES ($1, $2)"
                    " RETURNING id",
                    runner.name,
                    hash_token(runner.token),
                )
                for runner in fleet
            ]
            await connection.executemany(
                "INSERT INTO commands (id, runner_id, argv, status, dispatched_at,"
                " started_at) VALUES ($1, $2, $3::jsonb, 'running', now(), now())",
                [
                    (command, runner_ids[owner_of[command]], json.dumps(["bench"]))
                    for command in commands
                ],
            )
            await connection.executemany(
                "INSERT INTO command_delivery (command_id) VALUES ($1)",
                [(command,) for command in commands],
            )
    finally:
        await connection.close()

    for event in workload.events():
        fleet[owner_of[event.command_id]].events.append(event)
    return fleet


def encode_event(event: BenchEvent, emitted_at: float | None = None) -> bytes:
    """One event's JSON as the runner's link encodes it."""
    return _encoder.encode(
        wire.WireEvent(
            command_id=event.command_id,
            kind="output",
            id=event.id,
            sequence=event.sequence,
            stream="stdout",
            data=event.data,
            emitted_at=emitted_at,
        )
    )


class RefusedError(RuntimeError):
    """The broker refused a frame or an event; the benchmark stops there."""


class WireRunner:
    """Sends one runner's events to a broker and times their acknowledgements."""

    def __init__(self, broker_url: str, runner: FleetRunner) -> None:
        self.broker_url = broker_url
        self.runner = runner
        self.latencies_ms: list[float] = []
        self.acknowledged = 0
        self._sent_at: dict[uuid.UUID, float] = {}
        self._room = asyncio.Event()

    async def run(
        self,
        encoded: list[bytes] | None = None,
        connected: asyncio.Semaphore | None = None,
        go: asyncio.Event | None = None,
        produced: asyncio.Task[list[bytes]] | None = None,
    ) -> None:
        """Send every event and return once all are acknowledged.

        Once the broker's hello arrived, release ``connected`` and wait for
        ``go``, so that every connection starts sending at the same moment.
        With ``produced``, ``encoded`` grows while that task runs; the events
        are sent as they appear.
        """
        events = self.runner.events
        encoded = encoded if encoded is not None else [encode_event(e) for e in events]
        headers = {"Authorization": f"Bearer {self.runner.token}"}
        async with connect(
            self.broker_url,
            additional_headers=headers,
            compression=None,
            max_size=2**24,
            open_timeout=30,
        ) as connection:
            hello = wire.broker_message_decoder.decode(await connection.recv())
            if not isinstance(hello, wire.Hello):
                raise RefusedError(f"expected hello, got {type(hello).__name__}")
            limits = hello.limits
            if connected is not None:
                connected.release()
            if go is not None:
                await go.wait()
            receiver = asyncio.create_task(self._receive(connection, len(events)))
            receiver.add_done_callback(lambda _: self._room.set())

            position = 0
            while position < len(events):
                # Like the runner's link: wait for room in the window.
                while (
                    len(self._sent_at) >= RUNNER_WINDOW_EVENTS
                    or position >= len(encoded)
                ) and not receiver.done():
                    self._room.clear()
                    await self._room.wait()
                if receiver.done():
                    break
                end = self._frame_end(encoded, position, limits)
                now = time.perf_counter()
                for event in events[position:end]:
                    self._sent_at[event.id] = now
                await connection.send(frame_of(encoded[position:end]), text=True)
                position = end
            await receiver
            if produced is not None:
                await produced

    def _frame_end(self, encoded: list[bytes], start: int, limits: wire.Limits) -> int:
        # As many events as the window, the batch limit and the frame size allow.
        room = RUNNER_WINDOW_EVENTS - len(self._sent_at)
        last = min(len(encoded), start + room, start + limits.max_batch_events)
        frame_bytes = 64
        end = start
        while end < last and frame_bytes + len(encoded[end]) < limits.max_frame_bytes:
            frame_bytes += len(encoded[end]) + 1
            end += 1
        return max(end, start + 1)

    async def _receive(self, connection: ClientConnection, expected: int) -> None:
        async for raw in connection:
            message = wire.broker_message_decoder.decode(raw)
            if isinstance(message, wire.ErrorMessage):
                raise RefusedError(f"frame refused: {message.code}: {message.reason}")
            if not isinstance(message, wire.EventAck):
                continue
            if message.refused:
                first = message.refused[0]
                raise RefusedError(f"event refused: {first.code}: {first.reason}")
            now = time.perf_counter()
            for item in message.acknowledged:
                sent = self._sent_at.pop(item.id, None)
                if sent is not None:
                    self.latencies_ms.append(1000 * (now - sent))
                    self.acknowledged += 1
            self._room.set()
            if self.acknowledged >= expected:
                return
        raise RefusedError("the broker closed the connection")
