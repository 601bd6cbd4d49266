"""runledger's ingest driven by the runner's own spool and link.

The same workload, but each runner is the real thing minus its child: a
SQLite :class:`runner.spool.Spool` holding the runner's events (filled
before the clock starts) and a :class:`runner.connection.BrokerLink` that
drains it to the broker, windowed, and deletes each event from the spool
when its acknowledgement arrives. The time runs from starting the links to
the moment every spool is empty. The link does not expose per-event
acknowledgement times, so this row has throughput but no latency; the
wire-client rows give the latency of the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

from bench.compare.fleet import FleetRunner, prepare_fleet
from bench.compare.ingest import DELIVERY_TIMEOUT_SECONDS, start_brokers
from bench.compare.measure import (
    ResourceMonitor,
    Result,
    Workload,
    fixed_pids,
    own_process,
    postgres_backends,
)
from bench.compare.processes import ProcessGroup
from bench.compare.scratch import scratch_database
from core import wire
from runner.connection import BrokerLink
from runner.settings import RunnerSettings
from runner.spool import Spool

SPOOL_BYTES_LIMIT = 2**32


class _SettledHandler:
    """The part of the daemon the link talks to: it only counts down."""

    def __init__(self, spool: Spool, drained: asyncio.Event) -> None:
        self.spool = spool
        self.drained = drained

    def link_connected(self, limits: wire.Limits) -> None:
        return None

    def command_received(self, message: wire.CommandMessage) -> None:
        return None

    def cancel_received(self, message: wire.CancelMessage) -> None:
        return None

    def events_settled(self) -> None:
        if self.spool.spooled_count == 0:
            self.drained.set()


async def run_runner_links(workload: Workload, connections: int) -> Result:
    """Drain ``connections`` filled spools through real links to one broker."""
    async with (
        scratch_database(f"links{connections}") as (name, url),
        ProcessGroup() as processes,
    ):
        fleet = await prepare_fleet(url, workload, connections)
        servers = await start_brokers(url, 1, processes)
        folder = Path(tempfile.mkdtemp(prefix="runledger-bench-spools-"))
        spools: list[Spool] = []
        links: list[asyncio.Task[None]] = []
        drained: list[asyncio.Event] = []
        try:
            monitor, seconds = await _drain(
                name,
                servers[0].port,
                servers[0].pid,
                fleet,
                folder,
                spools,
                links,
                drained,
            )
        finally:
            for task in links:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for spool in spools:
                spool.close()
            shutil.rmtree(folder, ignore_errors=True)

    result = Result(
        scenario=f"runledger ingest, {connections} real runner links",
        system="runledger",
        durability="fsync at each commit, acknowledged after COMMIT",
        events=workload.events_total,
        seconds=seconds,
        notes=(
            f"{connections} runner spools (SQLite, synchronous=NORMAL) drained by "
            "the runner's BrokerLink; no per-event latency"
        ),
        group="ingest",
    )
    monitor.fill(result)
    result.parameters = {"connections": connections}
    return result


async def _drain(
    database: str,
    port: int,
    broker_pid: int,
    fleet: list[FleetRunner],
    folder: Path,
    spools: list[Spool],
    links: list[asyncio.Task[None]],
    drained: list[asyncio.Event],
) -> tuple[ResourceMonitor, float]:
    # Fill each runner's spool as its child would have, before the clock.
    for runner in fleet:
        spool = Spool.open(folder / f"{runner.name}.sqlite3", SPOOL_BYTES_LIMIT)
        spools.append(spool)
        for command_id in {event.command_id for event in runner.events}:
            spool.accept_command(command_id)
        for event in runner.events:
            spool.append(event.command_id, "output", stream="stdout", data=event.data)

    monitor = ResourceMonitor(
        {
            "load": own_process,
            "broker": fixed_pids(broker_pid),
            "postgres": postgres_backends(database),
        }
    )
    with monitor:
        started = time.perf_counter()
        for runner, spool in zip(fleet, spools, strict=True):
            done = asyncio.Event()
            drained.append(done)
            settings = RunnerSettings(
                broker_url=f"ws://127.0.0.1:{port}", token=runner.token
            )
            link = BrokerLink(settings, spool, _SettledHandler(spool, done))
            links.append(asyncio.create_task(link.run()))
        await asyncio.wait_for(
            asyncio.gather(*(event.wait() for event in drained)),
            DELIVERY_TIMEOUT_SECONDS,
        )
        seconds = time.perf_counter() - started
    return monitor, seconds
