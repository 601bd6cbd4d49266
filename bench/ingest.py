"""Ingest benchmark: the events table's raw insert limit against runledger's broker.

One run measures, on this machine and one scratch database:

1. the raw limit: the same ~200-byte output events of 100 commands written
   straight from asyncpg, by ``COPY`` and by an ``unnest`` insert, in
   transactions of ``--raw-batch`` rows, once before and once after the
   broker's turn (the machine may be shared; the mean is compared);
2. acknowledgement latency at ``--rate`` events/s: ``--clients`` runner
   connections (one command each) send small batches at a steady pace to a
   broker in its own process; the time from sending a batch to reading its
   ``event-ack`` is recorded per batch (p50, p99);
3. runledger's end-to-end ingest: as many fresh connections send
   ``--batch``-event batches flat out, each keeping ``--window`` batches
   unacknowledged; the rate counts events durable and acknowledged.

Run: ``PGHOST=127.0.0.1 .venv/bin/python -m bench.ingest`` (``DATABASE_URL``
or ``PG*`` say where Postgres is). Results go to standard output and, as
JSON, to ``bench/results/ingest.json``. ``BENCH_PROFILE=FILE`` runs the
broker under cProfile; ``RUNLEDGER_*`` variables set the broker's settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from websockets.asyncio.client import ClientConnection, connect

from bench.scratch import create_database, drop_database
from core import wire
from core.database import database_url_from_env
from core.logging import configure_logging
from core.loop import run_event_loop
from core.settings import load_settings
from core.tokens import hash_token, new_token

RESULTS = Path(__file__).parent / "results" / "ingest.json"
EVENT_BYTES = 200
COLUMNS = ["command_id", "sequence", "id", "kind", "stream", "data", "emitted_at"]
UNNEST_INSERT = """
INSERT INTO events (command_id, sequence, id, kind, stream, data, emitted_at)
SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::text[],
                     $6::bytea[], $7::timestamptz[])
"""


@dataclass(frozen=True)
class Options:
    """What one run measures, and how hard."""

    raw_events: int
    raw_batch: int
    commands: int
    clients: int
    batch: int
    window: int
    end_to_end_events: int
    rate: int
    latency_seconds: float


def parse_options(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw-events", type=int, default=200_000)
    parser.add_argument("--raw-batch", type=int, default=1000)
    parser.add_argument("--commands", type=int, default=100)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--end-to-end-events", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=5000)
    parser.add_argument("--latency-seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    return Options(**vars(args))


# Scratch database


def scratch_database(server_url: str) -> tuple[str, str]:
    """Create and migrate a fresh database; return (name, url)."""
    name = f"runledger_bench_ingest_{os.getpid()}"
    return name, asyncio.run(create_database(server_url, name))


# Raw limit


def output_chunk() -> bytes:
    """About 200 bytes of build output, as a chunk of it looks."""
    line = f"compiling module_{random.randrange(10**6):06d}.py ... ok\n".encode()
    return (line * (EVENT_BYTES // len(line) + 1))[:EVENT_BYTES]


def raw_rows(options: Options) -> list[tuple[Any, ...]]:
    """Events of ``commands`` commands, interleaved as concurrent runners send them."""
    commands = [uuid.uuid4() for _ in range(options.commands)]
    now = datetime.now(UTC)
    chunk = output_chunk()
    return [
        (
            commands[n % options.commands],
            n // options.commands + 1,
            uuid.uuid4(),
            "output",
            "stdout",
            chunk,
            now,
        )
        for n in range(options.raw_events)
    ]


async def measure_raw(url: str, options: Options) -> dict[str, float]:
    """Events/s of COPY and of the unnest insert, one transaction per batch."""
    rows = raw_rows(options)
    batches = [
        rows[start : start + options.raw_batch]
        for start in range(0, len(rows), options.raw_batch)
    ]
    connection = await asyncpg.connect(url)
    results: dict[str, float] = {}
    try:
        for method in ("copy", "unnest"):
            await connection.execute("TRUNCATE events")
            started = time.perf_counter()
            for batch in batches:
                async with connection.transaction():
                    if method == "copy":
                        await connection.copy_records_to_table(
                            "events", records=batch, columns=COLUMNS
                        )
                    else:
                        await connection.execute(
                            UNNEST_INSERT, *zip(*batch, strict=True)
                        )
            results[method] = len(rows) / (time.perf_counter() - started)
        await connection.execute("TRUNCATE events")
    finally:
        await connection.close()
    return results


# End to end


async def register_clients(url: str, count: int) -> list[tuple[str, uuid.UUID]]:
    """``count`` runners, each with one dispatched command: (token, command id)."""
    connection = await asyncpg.connect(url)
    try:
        clients = []
        for number in range(count):
            token = new_token()
            runner_id = await connection.fetchval(
                "INSERT INTO runners (name, token_hash) VALUES ($1, $2) RETURNING id",
                f"bench-{uuid.uuid4().hex[:8]}-{number}",
                hash_token(token),
            )
            command_id = await connection.fetchval(
                "INSERT INTO commands (runner_id, argv, dispatched_at, status) "
                "VALUES ($1, '[\"bench\"]', now(), 'dispatched') RETURNING id",
                runner_id,
            )
            clients.append((token, command_id))
        return clients
    finally:
        await connection.close()


def start_broker(url: str) -> tuple[subprocess.Popen[str], int]:
    """A broker in its own process on a free port; returns it and its port.

    With ``BENCH_PROFILE=FILE`` the broker runs under cProfile into FILE.
    """
    profile_file = os.environ.get("BENCH_PROFILE")
    profile = ["-m", "cProfile", "-o", profile_file] if profile_file else []
    process = subprocess.Popen(
        [sys.executable, *profile, "-m", "bench.ingest", "--serve-broker", url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "RUNLEDGER_LOG_LEVEL": "WARNING"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("port "):
        process.kill()
        raise RuntimeError(f"broker did not start: {line!r}")
    return process, int(line.split()[1])


async def serve_broker(url: str) -> None:
    """Run a broker until the parent closes our standard input."""
    from broker.server import BrokerServer
    from broker.settings import BrokerSettings

    configure_logging("WARNING")
    # RUNLEDGER_* variables still apply, to try other settings.
    settings = load_settings(
        BrokerSettings, {"port": 0, "max_events_per_second": 10**6}
    )
    broker = BrokerServer(settings, url)
    await broker.start()
    print(f"port {broker.port}", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await broker.stop()


class Client:
    """One runner connection sending events of its command."""

    def __init__(self, connection: ClientConnection, command_id: uuid.UUID) -> None:
        self.connection = connection
        self.command_id = command_id
        self.next_sequence = 1
        self.chunk = output_chunk()

    @classmethod
    async def open(cls, port: int, token: str, command_id: uuid.UUID) -> Client:
        connection = await connect(
            f"ws://127.0.0.1:{port}",
            additional_headers={"Authorization": f"Bearer {token}"},
            max_size=None,
            compression=None,
        )
        hello = wire.broker_message_decoder.decode(await connection.recv())
        assert isinstance(hello, wire.Hello)
        return cls(connection, command_id)

    def batch_frame(self, size: int) -> str:
        events = []
        for _ in range(size):
            events.append(
                wire.WireEvent(
                    command_id=self.command_id,
                    kind="output",
                    id=uuid.uuid4(),
                    sequence=self.next_sequence,
                    stream="stdout",
                    data=self.chunk,
                    emitted_at=time.time(),
                )
            )
            self.next_sequence += 1
        return wire.encode(wire.EventsMessage(events=events)).decode()

    async def read_acknowledgement(self) -> int:
        """Events acknowledged by the next event-ack; other messages are skipped."""
        while True:
            message = wire.broker_message_decoder.decode(await self.connection.recv())
            if isinstance(message, wire.EventAck):
                if message.refused:
                    raise RuntimeError(f"broker refused events: {message.refused[0]}")
                return len(message.acknowledged)
            if isinstance(message, wire.ErrorMessage):
                raise RuntimeError(f"broker error: {message.code}: {message.reason}")


async def measure_throughput(clients: list[Client], options: Options) -> float:
    """Events/s durable and acknowledged with every client sending flat out."""
    per_client = options.end_to_end_events // len(clients)
    batches = per_client // options.batch

    # A runner's spool holds its events ready to send; so do these clients,
    # so that the clock measures the broker rather than this process.
    frames = {
        id(client): [client.batch_frame(options.batch) for _ in range(batches)]
        for client in clients
    }

    async def stream(client: Client) -> int:
        in_flight = asyncio.Semaphore(options.window)
        acknowledged = 0

        async def read_all() -> None:
            nonlocal acknowledged
            while acknowledged < batches * options.batch:
                acknowledged += await client.read_acknowledgement()
                in_flight.release()

        reader = asyncio.create_task(read_all())
        for frame in frames[id(client)]:
            await in_flight.acquire()
            await client.connection.send(frame)
        await reader
        return acknowledged

    started = time.perf_counter()
    counts = await asyncio.gather(*(stream(client) for client in clients))
    return sum(counts) / (time.perf_counter() - started)


async def measure_latency(clients: list[Client], options: Options) -> dict[str, float]:
    """Per-batch acknowledgement latency with the clients pacing ``rate`` events/s."""
    interval = 0.1
    batch = max(1, round(options.rate * interval / len(clients)))
    rounds = int(options.latency_seconds / interval)
    latencies: list[float] = []

    async def pace(client: Client, offset: float) -> None:
        await asyncio.sleep(offset)
        sent_at: asyncio.Queue[float] = asyncio.Queue()

        async def read_all() -> None:
            for _ in range(rounds):
                await client.read_acknowledgement()
                latencies.append(time.perf_counter() - sent_at.get_nowait())

        reader = asyncio.create_task(read_all())
        next_send = time.perf_counter()
        for _ in range(rounds):
            frame = client.batch_frame(batch)
            sent_at.put_nowait(time.perf_counter())
            await client.connection.send(frame)
            next_send += interval
            await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
        await reader

    started = time.perf_counter()
    await asyncio.gather(
        *(pace(client, interval * n / len(clients)) for n, client in enumerate(clients))
    )
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "offered_events_per_second": len(clients) * batch / interval,
        "achieved_events_per_second": len(latencies) * batch / elapsed,
        "events_per_batch": batch,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
        "max_ms": 1000 * ordered[-1],
        "batches": len(ordered),
    }


async def measure_end_to_end(url: str, options: Options) -> dict[str, Any]:
    registrations = await register_clients(url, 2 * options.clients)
    process, port = start_broker(url)
    try:
        # Latency first, on a quiet table; then throughput, flat out.
        latency_clients = [
            await Client.open(port, token, command_id)
            for token, command_id in registrations[options.clients :]
        ]
        latency = await measure_latency(latency_clients, options)
        for client in latency_clients:
            await client.connection.close()
        commits = await broker_commit_figures(port)

        throughput_clients = [
            await Client.open(port, token, command_id)
            for token, command_id in registrations[: options.clients]
        ]
        throughput = await measure_throughput(throughput_clients, options)
        for client in throughput_clients:
            await client.connection.close()
    finally:
        # Closing its standard input stops the broker cleanly.
        assert process.stdin is not None
        process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
        if process.poll() is None:
            process.kill()

    stored = await _count_events(url)
    return {
        "events_per_second": throughput,
        "latency": latency,
        "stored": stored,
        "broker_commits": commits,
    }


async def broker_commit_figures(port: int) -> dict[str, float]:
    """Transactions, events per transaction and seconds per transaction, overall."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    page = (await reader.read()).decode()
    writer.close()
    values = {}
    for line in page.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith(("runledger_broker_commit_", "runledger_broker_ack")):
            values[name] = float(value)
    transactions = values.get("runledger_broker_commit_seconds_count", 0.0)
    frames = values.get("runledger_broker_acknowledge_latency_seconds_count", 0.0)
    within = values.get(
        'runledger_broker_acknowledge_latency_seconds_bucket{le="0.01"}', 0.0
    )
    return {
        "frames_acknowledged_within_10ms": within / max(frames, 1),
        "transactions": transactions,
        "events_per_transaction": values.get(
            "runledger_broker_commit_batch_events_sum", 0
        )
        / max(transactions, 1),
        "milliseconds_per_transaction": 1000
        * values.get("runledger_broker_commit_seconds_sum", 0)
        / max(transactions, 1),
    }


async def _count_events(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM events")
        return count
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["--serve-broker"]:
        # The same loop as `runledger broker`: uvloop where installed.
        run_event_loop(serve_broker(arguments[1]))
        return

    options = parse_options(arguments)
    server_url = database_url_from_env()
    if server_url is None:
        raise SystemExit("set DATABASE_URL or PGHOST to say where Postgres runs")
    load_before = os.getloadavg()[0]
    name, url = scratch_database(server_url)
    try:
        # The raw limit is taken before and after, as the machine may be shared.
        raw_before = asyncio.run(measure_raw(url, options))
        end_to_end = asyncio.run(measure_end_to_end(url, options))
        raw_after = asyncio.run(measure_raw(url, options))
    finally:
        asyncio.run(drop_database(server_url, name))

    # The machine may be shared; its load says how far to trust the figures.
    load = {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}
    raw = {
        method: (raw_before[method] + raw_after[method]) / 2 for method in raw_before
    }
    ratio = end_to_end["events_per_second"] / raw["unnest"]
    latency = end_to_end["latency"]
    for method, label in (("copy", "raw COPY"), ("unnest", "raw unnest insert")):
        print(
            f"{label:<19} {raw[method]:>10,.0f} events/s (before "
            f"{raw_before[method]:,.0f}, after {raw_after[method]:,.0f})"
        )
    print(
        f"runledger ingest    {end_to_end['events_per_second']:>10,.0f} events/s "
        f"({ratio:.0%} of unnest; target 40%)"
    )
    print(
        f"acknowledgement at {latency['achieved_events_per_second']:,.0f} events/s: "
        f"p50 {latency['p50_ms']:.2f} ms, p99 {latency['p99_ms']:.2f} ms "
        f"(target p99 < 10 ms), max {latency['max_ms']:.1f} ms"
    )
    commits = end_to_end["broker_commits"]
    print(
        f"broker transactions at {options.rate:,} events/s: "
        f"{commits['transactions']:,.0f}, "
        f"{commits['events_per_transaction']:.0f} events and "
        f"{commits['milliseconds_per_transaction']:.2f} ms each on average; "
        f"{commits['frames_acknowledged_within_10ms']:.1%} of frames acknowledged "
        "within 10 ms of the broker reading them (latency phase)"
    )
    print(
        f"load average {load['before']:.1f} before, {load['after']:.1f} after, "
        f"on {load['cpus']} CPUs"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "options": dataclasses.asdict(options),
                "raw_events_per_second": raw,
                "raw_before": raw_before,
                "raw_after": raw_after,
                "end_to_end": end_to_end,
                "ratio_to_unnest": ratio,
                "load_average": load,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
