"""runledger's ingest: runner to durable and acknowledged, at several scales.

A broker (or two) in processes of their own, on a scratch database, and
``connections`` runner connections from this process (see
:class:`bench.compare.fleet.WireRunner`). An event's latency runs from the
moment its frame is sent to the moment its acknowledgement arrives, which
the broker sends only after the transaction holding it has committed.

With ``relays`` > 0, that many relays forward the stored events at the same
time to a counting HTTP sink, as they would in production; the result then
also says how long after the last acknowledgement the last delivery ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from typing import Any

import asyncpg

from bench.compare.fleet import WireRunner, encode_event, prepare_fleet
from bench.compare.measure import (
    ResourceMonitor,
    Result,
    Workload,
    fixed_pids,
    own_process,
    postgres_backends,
)
from bench.compare.processes import (
    ProcessGroup,
    ServerProcess,
    python_module,
    start_server_process,
)
from bench.compare.scratch import scratch_database

# The per-connection rate limit (20,000 events/s by default) would cap one
# connection; the benchmark measures the path, so it is lifted.
BROKER_OVERRIDES: dict[str, Any] = {"max_events_per_second": 10_000_000}
DELIVERY_TIMEOUT_SECONDS = 600.0


async def start_brokers(
    url: str, count: int, processes: ProcessGroup
) -> list[ServerProcess]:
    """``count`` broker processes on database ``url``, stopped with ``processes``."""
    started = []
    for index in range(count):
        broker = await start_server_process(
            f"broker-{index}",
            python_module(
                "bench.compare.serve",
                "broker",
                "--database-url",
                url,
                "--settings",
                json.dumps({**BROKER_OVERRIDES, "broker_id": f"bench-broker-{index}"}),
            ),
        )
        processes.add(broker)
        started.append(broker)
    return started


async def start_relays(
    url: str, count: int, sink_url: str, processes: ProcessGroup
) -> list[ServerProcess]:
    """``count`` relay processes forwarding to ``sink_url``."""
    settings = {
        "sink_url": sink_url,
        "signing_secret": secrets.token_urlsafe(32),
        "relay_metrics_port": 0,
    }
    started = []
    for index in range(count):
        relay = await start_server_process(
            f"relay-{index}",
            python_module(
                "bench.compare.serve",
                "relay",
                "--database-url",
                url,
                "--settings",
                json.dumps(settings),
            ),
        )
        processes.add(relay)
        started.append(relay)
    return started


async def wait_delivered(url: str, total: int, limit_seconds: float) -> float:
    """Seconds until every stored event is delivered; raise after the limit."""
    started = time.perf_counter()
    connection = await asyncpg.connect(url)
    try:
        while True:
            delivered = await connection.fetchval(
                "SELECT coalesce(sum(delivered_through), 0) FROM command_delivery"
            )
            if delivered >= total:
                return time.perf_counter() - started
            if time.perf_counter() - started > limit_seconds:
                raise TimeoutError(f"only {delivered} of {total} events delivered")
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


async def run_ingest(
    workload: Workload,
    connections: int,
    *,
    brokers: int = 1,
    relays: int = 0,
    scenario: str | None = None,
    group: str = "ingest",
) -> Result:
    """Send the workload over ``connections`` runners; all acknowledged."""
    workload = Workload(workload.events_total, max(workload.commands, connections))
    async with (
        scratch_database(f"ingest{connections}") as (name, url),
        ProcessGroup() as processes,
    ):
        fleet = await prepare_fleet(url, workload, connections)
        encoded = [[encode_event(e) for e in runner.events] for runner in fleet]
        servers = await start_brokers(url, brokers, processes)
        relay_processes: list[ServerProcess] = []
        if relays:
            sink = await start_server_process(
                "sink", python_module("bench.compare.sink")
            )
            processes.add(sink)
            relay_processes = await start_relays(
                url,
                relays,
                f"http://127.0.0.1:{sink.port}/api/runner/events",
                processes,
            )
        monitor = ResourceMonitor(
            {
                "load": own_process,
                "broker": fixed_pids(*(s.pid for s in servers)),
                "relay": fixed_pids(*(r.pid for r in relay_processes)),
                "postgres": postgres_backends(name),
            }
        )
        runners = [
            WireRunner(f"ws://127.0.0.1:{servers[i % brokers].port}", runner)
            for i, runner in enumerate(fleet)
        ]
        delivered_after = None
        connected = asyncio.Semaphore(0)
        go = asyncio.Event()
        sending = asyncio.gather(
            *(r.run(e, connected, go) for r, e in zip(runners, encoded, strict=True))
        )
        try:
            # Every connection is open before the clock starts.
            async with asyncio.timeout(120):
                for _ in runners:
                    await connected.acquire()
            with monitor:
                started = time.perf_counter()
                go.set()
                await asyncio.wait_for(sending, DELIVERY_TIMEOUT_SECONDS)
                seconds = time.perf_counter() - started
                if relays:
                    delivered_after = await wait_delivered(
                        url, workload.events_total, DELIVERY_TIMEOUT_SECONDS
                    )
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sending
        stored = await _count_events(url)

    if stored != workload.events_total:
        raise RuntimeError(f"{stored} of {workload.events_total} events stored")
    notes = (
        f"{connections} wire-client runners, {brokers} broker(s), "
        "per-connection rate limit lifted"
    )
    if relays:
        notes += (
            f", {relays} relays delivering; all delivered {delivered_after:.1f} s"
            " after the last acknowledgement"
        )
    result = Result(
        scenario=scenario or f"runledger ingest, {connections} connections",
        system="runledger",
        durability="fsync at each commit, acknowledged after COMMIT",
        events=workload.events_total,
        seconds=seconds,
        latencies_ms=[ms for r in runners for ms in r.latencies_ms],
        notes=notes,
        group=group,
    )
    monitor.fill(result)
    result.parameters = {
        "connections": connections,
        "brokers": brokers,
        "relays": relays,
        "commands": workload.commands,
    }
    if delivered_after is not None:
        result.parameters["delivered_after_seconds"] = round(delivered_after, 2)
    return result


async def _count_events(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM events")
        return count
    finally:
        await connection.close()
