"""The limit: the workload's rows written straight into the events table.

Two ways, each by ``WRITERS`` connections taking batches in turn and
committing each batch: asyncpg's binary COPY, and one set-based
``INSERT ... SELECT FROM unnest(...)`` per batch (the statement the broker
uses, without its checks). Latency is per batch, from its start to its
commit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import asyncpg

from bench.compare.measure import (
    BenchEvent,
    ResourceMonitor,
    Result,
    Workload,
    own_process,
    postgres_backends,
)
from bench.compare.scratch import scratch_database

BATCH_EVENTS = 2000
WRITERS = 2
COLUMNS = ("command_id", "sequence", "id", "kind", "stream", "data")

INSERT_UNNEST = """
INSERT INTO events (command_id, sequence, id, kind, stream, data)
SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[],
                     $5::text[], $6::bytea[])
"""

BatchWriter = Callable[[asyncpg.Connection, list[BenchEvent]], Awaitable[None]]


async def _copy(connection: asyncpg.Connection, batch: list[BenchEvent]) -> None:
    async with connection.transaction():
        await connection.copy_records_to_table(
            "events",
            records=[
                (e.command_id, e.sequence, e.id, "output", "stdout", e.data)
                for e in batch
            ],
            columns=COLUMNS,
        )


async def _unnest(connection: asyncpg.Connection, batch: list[BenchEvent]) -> None:
    async with connection.transaction():
        await connection.execute(
            INSERT_UNNEST,
            [e.command_id for e in batch],
            [e.sequence for e in batch],
            [e.id for e in batch],
            ["output"] * len(batch),
            ["stdout"] * len(batch),
            [e.data for e in batch],
        )


async def _write_all(
    connections: list[asyncpg.Connection], events: list[BenchEvent], write: BatchWriter
) -> tuple[float, list[float]]:
    batches = [
        events[start : start + BATCH_EVENTS]
        for start in range(0, len(events), BATCH_EVENTS)
    ]
    latencies: list[float] = []

    async def writer(connection: asyncpg.Connection) -> None:
        while batches:
            batch = batches.pop(0)
            started = time.perf_counter()
            await write(connection, batch)
            elapsed_ms = 1000 * (time.perf_counter() - started)
            latencies.extend([elapsed_ms] * len(batch))

    started = time.perf_counter()
    await asyncio.gather(*(writer(c) for c in connections))
    return time.perf_counter() - started, latencies


async def run_limit(workload: Workload) -> list[Result]:
    """COPY and set-based insert of the whole workload, each in a fresh database."""
    events = workload.events()
    results = []
    for scenario, write in (("limit: COPY", _copy), ("limit: unnest insert", _unnest)):
        async with scratch_database("limit") as (name, url):
            connections = [await asyncpg.connect(url) for _ in range(WRITERS)]
            monitor = ResourceMonitor(
                {"load": own_process, "postgres": postgres_backends(name)}
            )
            try:
                with monitor:
                    seconds, latencies = await _write_all(connections, events, write)
            finally:
                for connection in connections:
                    await connection.close()
            result = Result(
                scenario=scenario,
                system="Postgres (asyncpg)",
                durability="fsync at each commit",
                events=len(events),
                seconds=seconds,
                latencies_ms=latencies,
                notes=f"{WRITERS} connections, {BATCH_EVENTS} rows per commit",
                group="limit",
            )
            monitor.fill(result)
            results.append(result)
    return results
