"""The old design, rebuilt as a baseline: one event per message, per commit.

The predecessor's broker, as its summary describes it: the runner sends each
event in its own WebSocket message; the broker stores it with one INSERT and
one COMMIT, puts it on a forwarding queue served by 5 workers that each POST
one event to the web tier, and acknowledges the event to the runner once its
forward succeeded. The runner keeps up to 1,000 events unacknowledged.

``python -m bench.compare.legacy --database-url URL --sink-url URL`` runs the
server alone and prints ``port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid

import asyncpg
import httpx
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bench.compare.measure import (
    BenchEvent,
    ResourceMonitor,
    Result,
    Workload,
    fixed_pids,
    own_process,
    postgres_backends,
)
from bench.compare.processes import (
    ProcessGroup,
    python_module,
    start_server_process,
)
from bench.compare.scratch import scratch_database
from core import wire
from core.loop import run_event_loop

FORWARD_WORKERS = 5
RUNNER_WINDOW = 1000
POOL_SIZE = 10

INSERT_ONE = """
INSERT INTO events (command_id, sequence, id, kind, stream, data)
VALUES ($1, $2, $3, $4, $5, $6)
"""


class LegacyBroker:
    """Store each event on its own, forward it with 5 workers, then acknowledge."""

    def __init__(self, database_url: str, sink_url: str) -> None:
        self.database_url = database_url
        self.sink_url = sink_url
        self.port = 0
        self._queue: asyncio.Queue[tuple[ServerConnection, wire.WireEvent]] = (
            asyncio.Queue()
        )
        self._pool: asyncpg.Pool | None = None
        self._workers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.database_url, min_size=POOL_SIZE, max_size=POOL_SIZE
        )
        self._workers = [
            asyncio.create_task(self._forward_worker()) for _ in range(FORWARD_WORKERS)
        ]
        server = await serve(self._handle, "127.0.0.1", 0, compression=None)
        self.port = server.sockets[0].getsockname()[1] if server.sockets else 0
        self._server = server

    async def _handle(self, connection: ServerConnection) -> None:
        pending: set[asyncio.Task[None]] = set()
        with contextlib.suppress(ConnectionClosed):
            async for raw in connection:
                message = wire.runner_message_decoder.decode(raw)
                if isinstance(message, wire.LegacyEventMessage):
                    task = asyncio.create_task(self._store(connection, message.event))
                    pending.add(task)
                    task.add_done_callback(pending.discard)

    async def _store(self, connection: ServerConnection, event: wire.WireEvent) -> None:
        # One INSERT, one COMMIT (autocommit), then the forwarding queue.
        assert self._pool is not None
        await self._pool.execute(
            INSERT_ONE,
            event.command_id,
            event.sequence,
            event.id,
            event.kind,
            event.stream,
            event.data,
        )
        await self._queue.put((connection, event))

    async def _forward_worker(self) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                connection, event = await self._queue.get()
                response = await client.post(self.sink_url, content=wire.encode(event))
                if response.status_code >= 300:
                    continue
                assert event.id is not None and event.sequence is not None
                acknowledgement = wire.EventAck(
                    acknowledged=[
                        wire.Acknowledged(event.id, event.command_id, event.sequence)
                    ]
                )
                with contextlib.suppress(ConnectionClosed):
                    await connection.send(wire.encode(acknowledgement), text=True)


async def _legacy_runner(
    url: str, events: list[BenchEvent], latencies: list[float]
) -> None:
    """Send each event alone, at most RUNNER_WINDOW unacknowledged."""
    window = asyncio.Semaphore(RUNNER_WINDOW)
    sent_at: dict[uuid.UUID, float] = {}
    frames = [
        wire.encode(
            wire.LegacyEventMessage(
                event=wire.WireEvent(
                    command_id=e.command_id,
                    kind="output",
                    id=e.id,
                    sequence=e.sequence,
                    stream="stdout",
                    data=e.data,
                )
            )
        )
        for e in events
    ]
    async with connect(url, compression=None, max_size=2**24) as connection:

        async def receive() -> None:
            remaining = len(events)
            async for raw in connection:
                message = wire.broker_message_decoder.decode(raw)
                if not isinstance(message, wire.EventAck):
                    continue
                now = time.perf_counter()
                for item in message.acknowledged:
                    latencies.append(1000 * (now - sent_at.pop(item.id)))
                    window.release()
                    remaining -= 1
                if remaining == 0:
                    return

        receiver = asyncio.create_task(receive())
        for event, frame in zip(events, frames, strict=True):
            await window.acquire()
            sent_at[event.id] = time.perf_counter()
            await connection.send(frame, text=True)
        await receiver


async def run_legacy(workload: Workload) -> Result:
    """The old design end to end: runner, broker, Postgres and an HTTP sink."""
    events = workload.events()
    async with (
        scratch_database("legacy") as (name, url),
        ProcessGroup() as processes,
    ):
        sink = await start_server_process("sink", python_module("bench.compare.sink"))
        processes.add(sink)
        broker = await start_server_process(
            "legacy-broker",
            python_module(
                "bench.compare.legacy",
                "--database-url",
                url,
                "--sink-url",
                f"http://127.0.0.1:{sink.port}/api/runner/events",
            ),
        )
        processes.add(broker)
        monitor = ResourceMonitor(
            {
                "load": own_process,
                "broker": fixed_pids(broker.pid),
                "sink": fixed_pids(sink.pid),
                "postgres": postgres_backends(name),
            }
        )
        latencies: list[float] = []
        with monitor:
            started = time.perf_counter()
            await asyncio.wait_for(
                _legacy_runner(f"ws://127.0.0.1:{broker.port}", events, latencies),
                1800,
            )
            seconds = time.perf_counter() - started

    result = Result(
        scenario="old design",
        system="predecessor rebuilt",
        durability="fsync at each commit, then HTTP forward",
        events=len(events),
        seconds=seconds,
        latencies_ms=latencies,
        notes=f"one event per message and commit, {FORWARD_WORKERS} forward workers",
        group="baseline",
    )
    monitor.fill(result)
    return result


async def _serve(database_url: str, sink_url: str) -> None:
    broker = LegacyBroker(database_url, sink_url)
    await broker.start()
    print(f"port {broker.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--sink-url", required=True)
    arguments = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        run_event_loop(_serve(arguments.database_url, arguments.sink_url))
