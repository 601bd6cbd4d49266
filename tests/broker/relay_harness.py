"""The relay's test harness: a real HTTP sink on a port of its own, and helpers.

It verifies every delivery's signature with :func:`core.signing.verify`,
applies a delivery id at most once (as the web tier's ingest does) and
records what arrived and when. Tests steer it: a delay before answering,
a status to answer with, or a delay after applying (commit, then answer
late). Plain asyncio HTTP/1.1 with keep-alive, so it is fast enough to
measure the relay rather than itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from broker.relay import Relay, RelaySettings
from core.commands import EVENTS_CHANNEL
from core.delivery import DeliveredEvent, batch_decoder, event_decoder
from core.errors import AuthenticationError
from core.signing import verify
from tests.conftest import create_command, register_runner

SECRET = "relay-test-secret"


@dataclass(frozen=True)
class Answer:
    """How the sink answers one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"{}"
    # Seconds to wait after applying and before answering (commit, answer late).
    delay_after_apply: float = 0.0


@dataclass(frozen=True)
class Request:
    """One request the sink received."""

    delivery_id: str
    arrived_at: float  # time.time()
    events: list[DeliveredEvent]
    late: bool
    status: int = 0


Behaviour = Callable[[int, str], Awaitable[Answer]]


def answering(answer: Answer) -> Behaviour:
    """A behaviour that gives every request the same answer."""

    async def fixed(_number: int, _delivery_id: str) -> Answer:
        return answer

    return fixed


class TestSink:
    """Records and applies deliveries; ``behaviour`` decides each answer."""

    __test__ = False

    def __init__(self, single_event: bool = False) -> None:
        self.single_event = single_event
        self.behaviour: Behaviour = answering(Answer())
        self.requests: list[Request] = []
        self.applied: list[DeliveredEvent] = []
        self.applied_ids: set[str] = set()
        self.duplicates = 0
        self.refused_signatures = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/runner/events"

    def applied_sequences(self, command_id: uuid.UUID) -> list[int]:
        return [e.sequence for e in self.applied if e.command_id == command_id]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = _parse_headers(head)
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                answer = await self._handle(headers, body)
                writer.write(
                    f"HTTP/1.1 {answer.status} X\r\n"
                    f"content-length: {len(answer.body)}\r\n".encode()
                    + b"".join(
                        f"{name}: {value}\r\n".encode()
                        for name, value in answer.headers.items()
                    )
                    + b"\r\n"
                    + answer.body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _handle(self, headers: dict[str, str], body: bytes) -> Answer:
        arrived_at = time.time()
        try:
            delivery_id = verify(SECRET.encode(), headers, body)
        except AuthenticationError as error:
            self.refused_signatures += 1
            return Answer(401, body=str(error).encode())

        if self.single_event:
            event = event_decoder.decode(body)
            events, late = [event], event.late
        else:
            batch = batch_decoder.decode(body)
            assert batch.delivery_id == delivery_id
            events, late = batch.events, batch.late

        number = len(self.requests)
        self.requests.append(Request(delivery_id, arrived_at, events, late))
        answer = await self.behaviour(number, delivery_id)
        self.requests[number] = Request(
            delivery_id, arrived_at, events, late, answer.status
        )
        if not 200 <= answer.status < 300:
            return answer

        # Apply once per delivery id, as the web tier's ingest does.
        if delivery_id in self.applied_ids:
            self.duplicates += 1
        else:
            self.applied_ids.add(delivery_id)
            self.applied.extend(events)
        if answer.delay_after_apply:
            await asyncio.sleep(answer.delay_after_apply)
        return answer


def _parse_headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    headers: dict[str, str] = {}
    for line in lines:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return headers


@contextlib.asynccontextmanager
async def running_sink(single_event: bool = False) -> AsyncIterator[TestSink]:
    """A started sink, stopped on exit."""
    sink = TestSink(single_event)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()


async def store_events(
    pool: asyncpg.Pool,
    command_id: uuid.UUID,
    sequences: range | list[int],
    *,
    exit_at: int | None = None,
    data_size: int = 16,
) -> None:
    """Insert output events (``exit`` at ``exit_at``) and notify, as the broker does."""
    sequences = list(sequences)
    kinds = ["exit" if s == exit_at else "output" for s in sequences]
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(
            """
            INSERT INTO events (command_id, sequence, id, kind, stream, data, payload)
            SELECT $1, s.sequence, gen_random_uuid(), s.kind,
                   CASE WHEN s.kind = 'output' THEN 'stdout' END,
                   CASE WHEN s.kind = 'output'
                        THEN convert_to(repeat('x', $4), 'UTF8')
                        ELSE ''::bytea END,
                   CASE WHEN s.kind = 'exit'
                        THEN '{"status": "succeeded", "exit_code": 0}'::jsonb END
            FROM unnest($2::bigint[], $3::text[]) AS s (sequence, kind)
            """,
            command_id,
            sequences,
            kinds,
            data_size,
        )
        await connection.execute(
            "SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(command_id)
        )


async def wait_until(
    condition: Callable[[], bool], within: float, interval: float = 0.05
) -> None:
    """Poll ``condition`` until true; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)


def relay_settings(sink: TestSink, **overrides: Any) -> RelaySettings:
    """Settings for a relay bound to ``sink``, quick enough for tests."""
    values: dict[str, Any] = {
        "sink_url": sink.url,
        "signing_secret": SECRET,
        "relay_request_timeout": 5.0,
        "relay_lease_duration": 30.0,
        "relay_scan_interval": 0.5,
        "relay_single_event_mode": sink.single_event,
    }
    values.update(overrides)
    return RelaySettings(**values)


@contextlib.asynccontextmanager
async def running_relay(
    database_url: str, sink: TestSink, **overrides: Any
) -> AsyncIterator[Relay]:
    """A started relay, stopped on exit."""
    relay = Relay(relay_settings(sink, **overrides), database_url)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


async def new_command(pool: asyncpg.Pool, runner_name: str = "laptop") -> uuid.UUID:
    """A queued command, with its relay state row, on a fresh or known runner."""
    runner_id = await pool.fetchval(
        "SELECT id FROM runners WHERE name = $1", runner_name
    )
    if runner_id is None:
        runner_id = (await register_runner(pool, runner_name)).id
    return await create_command(pool, runner_id, ["make"])


async def delivery_state(pool: asyncpg.Pool, command_id: uuid.UUID) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT * FROM command_delivery WHERE command_id = $1", command_id
    )
    assert row is not None
    return row


async def wait_for_state(
    pool: asyncpg.Pool, command_id: uuid.UUID, state: str, within: float = 30
) -> asyncpg.Record:
    """Poll the command's relay state until it is ``state``; return the row."""
    deadline = time.monotonic() + within
    while True:
        row = await delivery_state(pool, command_id)
        if row["state"] == state:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"command stayed {row['state']}, not {state}")
        await asyncio.sleep(0.05)


async def wait_for_cursor(
    pool: asyncpg.Pool, command_id: uuid.UUID, delivered_through: int
) -> asyncpg.Record:
    """Poll until the relay has recorded delivery through a sequence."""
    deadline = time.monotonic() + 30
    while True:
        row = await delivery_state(pool, command_id)
        if row["delivered_through"] >= delivered_through:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"delivered through {row['delivered_through']}")
        await asyncio.sleep(0.05)
