"""The alternatives a team would pick: NATS JetStream and RabbitMQ.

Both run on this machine (``127.0.0.1:4222`` with JetStream and
``127.0.0.1:5672`` as guest), are driven through their usual Python clients
(nats-py, aio-pika) with many publishes in flight, and every stream or queue
made here is deleted afterwards.

Durability differs, and the table says so: a RabbitMQ durable queue writes a
persistent message to disk (fsync) before it confirms it; JetStream with file
storage acknowledges once the message is in the server's write path and
syncs to disk on an interval (two minutes by default). A sync on every
message needs ``sync_interval: always`` in the server's configuration, which
nats-server 2.10 introduced.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import nats
from nats.js.api import StorageType, StreamConfig

from bench.compare.measure import (
    BenchEvent,
    ResourceMonitor,
    Result,
    Workload,
    own_process,
    processes_named,
)
from core import wire

NATS_URL = os.environ.get("BENCH_NATS_URL", "nats://127.0.0.1:4222")
RABBITMQ_URL = os.environ.get(
    "BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/"
)
IN_FLIGHT = 1000


def encoded_events(events: list[BenchEvent]) -> list[bytes]:
    """Each event as the runner would send it, one message body each."""
    return [
        wire.encode(
            wire.WireEvent(
                command_id=e.command_id,
                kind="output",
                id=e.id,
                sequence=e.sequence,
                stream="stdout",
                data=e.data,
            )
        )
        for e in events
    ]


def nats_server_version() -> str:
    """The installed nats-server's version, or "unknown"."""
    try:
        completed = subprocess.run(
            ["nats-server", "--version"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return completed.stdout.strip().rsplit("v", 1)[-1] or "unknown"


def nats_sync_always_supported(version: str) -> bool:
    """Whether ``sync_interval: always`` exists (nats-server 2.10 and later)."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 10)


async def run_jetstream(workload: Workload) -> Result:
    """Publish every event to a file-backed stream, acknowledgements awaited."""
    events = workload.events()
    bodies = encoded_events(events)
    prefix = f"rlbench{os.getpid()}"
    stream = f"RLBENCH_{os.getpid()}"
    client = await nats.connect(NATS_URL, connect_timeout=5)
    jetstream = client.jetstream(publish_async_max_pending=IN_FLIGHT)
    await jetstream.add_stream(
        StreamConfig(name=stream, subjects=[f"{prefix}.>"], storage=StorageType.FILE)
    )
    command_index = {c: i for i, c in enumerate(workload.command_ids())}
    subjects = [f"{prefix}.{command_index[e.command_id]}" for e in events]
    latencies: list[float] = []

    def recorder(sent_at: float) -> Callable[[asyncio.Future[Any]], None]:
        def done(future: asyncio.Future[Any]) -> None:
            if not future.cancelled() and future.exception() is None:
                latencies.append(1000 * (time.perf_counter() - sent_at))

        return done

    monitor = ResourceMonitor(
        {"load": own_process, "nats-server": processes_named("nats-server")}
    )
    try:
        with monitor:
            started = time.perf_counter()
            for subject, body in zip(subjects, bodies, strict=True):
                future = await jetstream.publish_async(subject, body)
                future.add_done_callback(recorder(time.perf_counter()))
            await asyncio.wait_for(jetstream.publish_async_completed(), 300)
            seconds = time.perf_counter() - started
        stored = (await jetstream.stream_info(stream)).state.messages
    finally:
        await jetstream.delete_stream(stream)
        await client.close()

    if stored != len(events):
        raise RuntimeError(f"JetStream stored {stored} of {len(events)} messages")
    result = Result(
        scenario="NATS JetStream, file, default sync",
        system="NATS JetStream",
        durability="acknowledged before fsync (sync every 2 min)",
        events=len(events),
        seconds=seconds,
        latencies_ms=latencies,
        notes=f"nats-py publish_async, {IN_FLIGHT} in flight, one subject per command",
        group="alternatives",
    )
    monitor.fill(result)
    return result


async def run_rabbitmq(workload: Workload, queue_type: str) -> Result:
    """Publish every event persistently to a durable queue, with confirms."""
    events = workload.events()
    bodies = encoded_events(events)
    queue_name = f"rlbench.{os.getpid()}.{queue_type}"
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
    channel = await connection.channel(publisher_confirms=True)
    arguments: dict[str, Any] = {"x-queue-type": queue_type}
    await channel.declare_queue(queue_name, durable=True, arguments=arguments)
    in_flight = asyncio.Semaphore(IN_FLIGHT)
    latencies: list[float] = []

    async def publish(body: bytes) -> None:
        try:
            sent_at = time.perf_counter()
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue_name,
            )
            latencies.append(1000 * (time.perf_counter() - sent_at))
        finally:
            in_flight.release()

    monitor = ResourceMonitor(
        {"load": own_process, "rabbitmq": processes_named("beam.smp")}
    )
    tasks: list[asyncio.Task[None]] = []
    try:
        with monitor:
            started = time.perf_counter()
            for body in bodies:
                await in_flight.acquire()
                tasks.append(asyncio.create_task(publish(body)))
            await asyncio.wait_for(asyncio.gather(*tasks), 600)
            seconds = time.perf_counter() - started
        declared = await channel.declare_queue(
            queue_name, durable=True, arguments=arguments, passive=True
        )
        stored = declared.declaration_result.message_count
    finally:
        await channel.queue_delete(queue_name)
        await connection.close()

    if stored is not None and stored != len(events):
        raise RuntimeError(f"RabbitMQ holds {stored} of {len(events)} messages")
    return _rabbitmq_result(queue_type, len(events), seconds, latencies, monitor)


def _rabbitmq_result(
    queue_type: str,
    events: int,
    seconds: float,
    latencies: list[float],
    monitor: ResourceMonitor,
) -> Result:
    result = Result(
        scenario=f"RabbitMQ {queue_type} queue, confirms",
        system="RabbitMQ",
        durability="fsync before confirm",
        events=events,
        seconds=seconds,
        latencies_ms=latencies,
        notes=f"aio-pika, persistent messages, {IN_FLIGHT} in flight",
        group="alternatives",
    )
    monitor.fill(result)
    return result


def jetstream_sync_always_note() -> str:
    """Why the JetStream sync-every-message row is missing, for the table."""
    version = nats_server_version()
    return (
        f"not measured: nats-server {version} has no sync_interval "
        "(added in 2.10), so JetStream cannot sync on every message here"
    )
