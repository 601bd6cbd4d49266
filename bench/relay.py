"""Relay benchmark: forwarding throughput, batched and one event per request, and lag.

One run, on this machine and one scratch database:

1. throughput, batched: ``--events`` output events (~200 bytes each) of
   ``--commands`` commands are stored first; a standalone relay process
   (``python -m broker.relay_cli relay``, default settings: 5 workers, batches
   of up to 500 events) forwards them to a local sink; the rate is events over
   the time from the relay being ready to the sink holding the last one;
2. the same in single-event mode (one event per request, as the predecessor's
   sink wanted) with ``--single-events`` events;
3. lag at ``--rate`` events/s, once per entry of ``--lag-commands`` (the
   number of commands sharing that rate): events are stored at that pace in
   small transactions (as the broker's group commit does, with its NOTIFY)
   while the relay runs, and each event's time from ``stored_at`` to its
   arrival at the sink is recorded (p50, p99), after one second of warm-up
   that is not counted. With more commands than workers, a command waits its
   turn for a worker, so lag grows with them.

The sink is the tests' sink (``tests/broker/relay_harness.py``): it verifies
every signature and applies each delivery id once, in this process.

Run: ``PGHOST=127.0.0.1 .venv/bin/python -m bench.relay``. Results go to
standard output and, as JSON, to ``bench/results/relay.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.scratch import create_database, drop_database
from core.commands import EVENTS_CHANNEL
from core.database import database_url_from_env
from tests.broker.relay_harness import SECRET, TestSink, running_sink

RESULTS = Path(__file__).parent / "results" / "relay.json"
REPOSITORY = Path(__file__).resolve().parents[1]
EVENT_BYTES = 200
LAG_TICK_SECONDS = 0.01
WARM_UP_SECONDS = 1.0

# One statement, as the broker's group commit: insert, then notify each command.
INSERT_EVENTS = """
WITH inserted AS (
    INSERT INTO events (command_id, sequence, id, kind, stream, data)
    SELECT command_id, sequence, gen_random_uuid(), 'output', 'stdout', $3
    FROM unnest($1::uuid[], $2::bigint[]) AS e (command_id, sequence)
    RETURNING command_id
)
SELECT count(pg_notify($4, command_id::text))
FROM (SELECT DISTINCT command_id FROM inserted) AS touched
"""


@dataclass(frozen=True)
class Options:
    commands: int
    events: int
    single_events: int
    rate: int
    lag_seconds: float
    lag_commands: list[int]


def parse_options(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.relay")
    parser.add_argument("--commands", type=int, default=20)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--single-events", type=int, default=5_000)
    parser.add_argument("--rate", type=int, default=5_000, help="events/s for lag")
    parser.add_argument("--lag-seconds", type=float, default=10.0)
    parser.add_argument(
        "--lag-commands",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[5, 20],
        help="commands sharing the rate, one lag run each (comma-separated)",
    )
    return Options(**vars(parser.parse_args(argv)))


# Scratch database


def create_scratch_database(server_url: str, purpose: str) -> tuple[str, str]:
    """A fresh, migrated database; returns (name, url)."""
    name = f"runledger_bench_relay_{purpose}_{os.getpid()}"
    return name, asyncio.run(create_database(server_url, name))


# Storing events


async def create_commands(
    connection: asyncpg.Connection, count: int
) -> list[uuid.UUID]:
    runner_id = await connection.fetchval(
        "INSERT INTO runners (name, token_hash) VALUES ('bench', $1) RETURNING id",
        uuid.uuid4().hex,
    )
    command_ids: list[uuid.UUID] = []
    for _ in range(count):
        command_id = await connection.fetchval(
            "INSERT INTO commands (runner_id, argv) VALUES ($1, '[\"make\"]') "
            "RETURNING id",
            runner_id,
        )
        await connection.execute(
            "INSERT INTO command_delivery (command_id) VALUES ($1)", command_id
        )
        command_ids.append(command_id)
    return command_ids


def output_chunk() -> bytes:
    line = b"compiling module_000042.py ... ok\n"
    return (line * (EVENT_BYTES // len(line) + 1))[:EVENT_BYTES]


async def store_round_robin(
    connection: asyncpg.Connection,
    command_ids: list[uuid.UUID],
    next_sequence: dict[uuid.UUID, int],
    count: int,
) -> None:
    """Store ``count`` events spread over the commands, and notify, in one statement."""
    commands: list[uuid.UUID] = []
    sequences: list[int] = []
    for index in range(count):
        command_id = command_ids[index % len(command_ids)]
        next_sequence[command_id] += 1
        commands.append(command_id)
        sequences.append(next_sequence[command_id])
    await connection.execute(
        INSERT_EVENTS, commands, sequences, output_chunk(), EVENTS_CHANNEL
    )


# The relay process


def start_relay(
    database_url: str, sink: TestSink, single_event: bool
) -> subprocess.Popen[bytes]:
    environment = dict(os.environ)
    environment.update(
        DATABASE_URL=database_url,
        RUNLEDGER_SIGNING_SECRET=SECRET,
        RUNLEDGER_LOG_LEVEL="WARNING",
    )
    profile = os.environ.get("BENCH_RELAY_PROFILE")
    argv = [
        sys.executable,
        *(["-m", "cProfile", "-o", profile] if profile else []),
        "-m",
        "broker.relay_cli",
        "relay",
        "--sink-url",
        sink.url,
        "--metrics-port",
        "0",
    ]
    if single_event:
        argv.append("--single-event-mode")
    return subprocess.Popen(
        argv, cwd=REPOSITORY, env=environment, stdout=subprocess.PIPE
    )


async def wait_ready(process: subprocess.Popen[bytes]) -> None:
    assert process.stdout is not None
    line = await asyncio.to_thread(process.stdout.readline)
    if b"relay: forwarding" not in line:
        raise SystemExit(f"the relay did not start: {line!r}")


def stop_relay(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def wait_for_count(sink: TestSink, count: int, deadline_seconds: float) -> None:
    deadline = time.monotonic() + deadline_seconds
    while len(sink.applied) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(sink.applied)} of {count} events arrived")
        await asyncio.sleep(0.005)


# Measurements


async def measure_throughput(
    database_url: str, options: Options, events: int, single_event: bool
) -> dict[str, Any]:
    connection = await asyncpg.connect(database_url)
    try:
        command_ids = await create_commands(connection, options.commands)
        next_sequence = dict.fromkeys(command_ids, 0)
        for start in range(0, events, 10_000):
            await store_round_robin(
                connection, command_ids, next_sequence, min(10_000, events - start)
            )
    finally:
        await connection.close()

    async with running_sink(single_event=single_event) as sink:
        process = start_relay(database_url, sink, single_event)
        try:
            await wait_ready(process)
            started = time.monotonic()
            await wait_for_count(sink, events, deadline_seconds=600)
            elapsed = time.monotonic() - started
        finally:
            await asyncio.to_thread(stop_relay, process)

    assert sink.duplicates == 0 and sink.refused_signatures == 0
    return {
        "events": events,
        "seconds": elapsed,
        "events_per_second": events / elapsed,
        "requests": len(sink.requests),
    }


async def measure_lag(
    database_url: str, options: Options, commands: int
) -> dict[str, Any]:
    connection = await asyncpg.connect(database_url)
    async with running_sink() as sink:
        process = start_relay(database_url, sink, single_event=False)
        try:
            command_ids = await create_commands(connection, commands)
            next_sequence = dict.fromkeys(command_ids, 0)
            await wait_ready(process)

            # Store at a steady pace: a small transaction every tick. The
            # first second warms connections and caches and is not counted.
            per_tick = max(1, round(options.rate * LAG_TICK_SECONDS))
            ticks = int((options.lag_seconds + WARM_UP_SECONDS) / LAG_TICK_SECONDS)
            warm_ticks = int(WARM_UP_SECONDS / LAG_TICK_SECONDS)
            started = time.monotonic()
            measured_from = time.time() + WARM_UP_SECONDS
            for tick in range(ticks):
                await store_round_robin(
                    connection, command_ids, next_sequence, per_tick
                )
                pause = started + (tick + 1) * LAG_TICK_SECONDS - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
            stored_seconds = time.monotonic() - started - WARM_UP_SECONDS
            await wait_for_count(sink, per_tick * ticks, deadline_seconds=120)
        finally:
            await asyncio.to_thread(stop_relay, process)
            await connection.close()

    lags_ms = sorted(
        (request.arrived_at - event.stored_at.timestamp()) * 1000
        for request in sink.requests
        for event in request.events
        if event.stored_at is not None and event.stored_at.timestamp() >= measured_from
    )
    quantiles = statistics.quantiles(lags_ms, n=100)
    return {
        "commands": commands,
        "achieved_events_per_second": per_tick * (ticks - warm_ticks) / stored_seconds,
        "events": len(lags_ms),
        "p50_ms": quantiles[49],
        "p99_ms": quantiles[98],
        "max_ms": lags_ms[-1],
        "requests": len(sink.requests),
    }


def run(server_url: str, purpose: str, measure: Any) -> dict[str, Any]:
    name, url = create_scratch_database(server_url, purpose)
    try:
        result: dict[str, Any] = asyncio.run(measure(url))
        return result
    finally:
        asyncio.run(drop_database(server_url, name))


def main(argv: list[str] | None = None) -> None:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    server_url = database_url_from_env()
    if server_url is None:
        raise SystemExit("set DATABASE_URL or PGHOST to say where Postgres runs")

    batched = run(
        server_url,
        "batched",
        lambda url: measure_throughput(url, options, options.events, False),
    )
    single = run(
        server_url,
        "single",
        lambda url: measure_throughput(url, options, options.single_events, True),
    )
    lags = [
        run(
            server_url,
            f"lag{commands}",
            lambda url, commands=commands: measure_lag(url, options, commands),
        )
        for commands in options.lag_commands
    ]

    ratio = batched["events_per_second"] / single["events_per_second"]
    # Other work on the machine moves these figures; say how busy it was.
    load_average = os.getloadavg()
    print(
        f"batched          {batched['events_per_second']:>10,.0f} events/s "
        f"({batched['events']:,} events in {batched['requests']:,} requests; "
        "target 20,000)"
    )
    print(
        f"one per request  {single['events_per_second']:>10,.0f} events/s "
        f"(batched is {ratio:.1f}x; target 10x)"
    )
    for lag in lags:
        print(
            f"lag at {lag['achieved_events_per_second']:,.0f} events/s over "
            f"{lag['commands']} commands: p50 {lag['p50_ms']:.1f} ms, "
            f"p99 {lag['p99_ms']:.1f} ms (target p99 < 100 ms), "
            f"max {lag['max_ms']:.1f} ms"
        )
    print(
        f"load average {load_average[0]:.2f} {load_average[1]:.2f} "
        f"{load_average[2]:.2f} on {os.cpu_count()} CPUs"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "options": asdict(options),
                "batched": batched,
                "single_event": single,
                "ratio": ratio,
                "lag": lags,
                "load_average": load_average,
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
