"""Web tier benchmark: reading the log by cursor, long-poll wake-up, ingest.

One run, on this machine and one scratch database, with the web tier served
by uvicorn in this process (the HTTP client shares its event loop and CPU):

1. paging: ``--events`` output events (~200 bytes) of one command are stored,
   then read through ``GET /api/commands/{id}/events`` in pages of
   ``--page`` events; the rate is events over the time to read them all;
2. wake-up: a reader long-polls (``wait=10``) at the end of the log while an
   event is committed with its NOTIFY, ``--wakes`` times; the figure is the
   time from the commit to the reader holding the event (p50, p99);
3. ingest: ``--batches`` signed deliveries of 500 output events each are
   posted to ``POST /api/runner/events``, one after the other.

Run: ``PGHOST=127.0.0.1 .venv/bin/python -m bench.web``. Results go to
standard output and, as JSON, to ``bench/results/web.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.relay import create_scratch_database, drop_scratch_database
from core import signing
from core.commands import EVENTS_CHANNEL, submit_command
from core.database import database_url_from_env
from core.delivery import DeliveredEvent, DeliveryBatch, delivery_id_for, encode
from web.server import WebServer
from web.settings import WebSettings

RESULTS = Path(__file__).parent / "results" / "web.json"
SECRET = "bench-signing-secret"
EVENT_BYTES = 200
BATCH_EVENTS = 500


async def _command(connection: asyncpg.Connection) -> uuid.UUID:
    runner_id = await connection.fetchval(
        "INSERT INTO runners (name, token_hash) VALUES ($1, $1) RETURNING id",
        uuid.uuid4().hex,
    )
    return await submit_command(connection, runner_id, ["bench"])


async def measure(url: str, options: argparse.Namespace) -> dict[str, Any]:
    """All three measurements against one served web tier."""
    connection = await asyncpg.connect(url)
    server = WebServer(WebSettings(port=0, signing_secret=SECRET), url)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            paging = await _paging(connection, client, options)
            wake = await _wake(connection, client, options)
            ingest = await _ingest(connection, client, options)
    finally:
        await server.stop()
        await connection.close()
    return {"paging": paging, "wake": wake, "ingest": ingest}


async def _paging(
    connection: asyncpg.Connection,
    client: httpx.AsyncClient,
    options: argparse.Namespace,
) -> dict[str, Any]:
    command_id = await _command(connection)
    await connection.execute(
        "INSERT INTO events (command_id, sequence, id, kind, stream, data)"
        " SELECT $1, n, gen_random_uuid(), 'output', 'stdout', $2"
        " FROM generate_series(1, $3) AS n",
        command_id,
        b"x" * EVENT_BYTES,
        options.events,
    )
    started = time.perf_counter()
    after, pages = 0, 0
    while after < options.events:
        response = await client.get(
            f"/api/commands/{command_id}/events",
            params={"after": after, "limit": options.page},
        )
        after = response.json()["next_after"]
        pages += 1
    seconds = time.perf_counter() - started
    return {
        "events": options.events,
        "page": options.page,
        "events_per_second": options.events / seconds,
        "ms_per_page": 1000 * seconds / pages,
    }


async def _wake(
    connection: asyncpg.Connection,
    client: httpx.AsyncClient,
    options: argparse.Namespace,
) -> dict[str, Any]:
    command_id = await _command(connection)
    latencies: list[float] = []
    for sequence in range(1, options.wakes + 1):
        reader = asyncio.create_task(
            client.get(
                f"/api/commands/{command_id}/events",
                params={"after": sequence - 1, "wait": 10},
            )
        )
        await asyncio.sleep(0.02)  # let the reader park
        async with connection.transaction():
            await connection.execute(
                "INSERT INTO events (command_id, sequence, id, kind, stream, data)"
                " VALUES ($1, $2, gen_random_uuid(), 'output', 'stdout', 'x')",
                command_id,
                sequence,
            )
            await connection.execute(
                "SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(command_id)
            )
        committed = time.perf_counter()
        response = await reader
        latencies.append(1000 * (time.perf_counter() - committed))
        assert response.json()["events"][0]["sequence"] == sequence
    quantiles = statistics.quantiles(latencies, n=100)
    return {"wakes": options.wakes, "p50_ms": quantiles[49], "p99_ms": quantiles[98]}


async def _ingest(
    connection: asyncpg.Connection,
    client: httpx.AsyncClient,
    options: argparse.Namespace,
) -> dict[str, Any]:
    command_id = await _command(connection)
    bodies = []
    for batch in range(options.batches):
        first = batch * BATCH_EVENTS + 1
        events = [
            DeliveredEvent(
                id=uuid.uuid4(),
                command_id=command_id,
                sequence=first + offset,
                kind="output",
                stream="stdout",
                data=b"x" * EVENT_BYTES,
                emitted_at=datetime.now(UTC),
            )
            for offset in range(BATCH_EVENTS)
        ]
        delivery_id = delivery_id_for(command_id, first, first + BATCH_EVENTS - 1)
        bodies.append(
            (delivery_id, encode(DeliveryBatch(delivery_id, command_id, events)))
        )

    started = time.perf_counter()
    for delivery_id, body in bodies:
        headers = signing.sign(SECRET.encode(), delivery_id, body)
        response = await client.post(
            "/api/runner/events", content=body, headers=headers
        )
        assert response.status_code == 200, response.text
    seconds = time.perf_counter() - started
    return {
        "deliveries": options.batches,
        "events_per_delivery": BATCH_EVENTS,
        "deliveries_per_second": options.batches / seconds,
        "events_per_second": options.batches * BATCH_EVENTS / seconds,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the three measurements, print them and keep them as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.web")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--page", type=int, default=1000)
    parser.add_argument("--wakes", type=int, default=200)
    parser.add_argument("--batches", type=int, default=200)
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    server_url = database_url_from_env()
    if server_url is None:
        raise SystemExit("set DATABASE_URL or PGHOST to say where Postgres runs")

    name, url = create_scratch_database(server_url, "web")
    try:
        results = asyncio.run(measure(url, options))
    finally:
        drop_scratch_database(server_url, name)

    paging, wake, ingest = results["paging"], results["wake"], results["ingest"]
    print(
        f"paging   {paging['events_per_second']:>10,.0f} events/s "
        f"({paging['ms_per_page']:.1f} ms per page of {paging['page']})"
    )
    print(f"wake-up  p50 {wake['p50_ms']:.1f} ms, p99 {wake['p99_ms']:.1f} ms")
    print(
        f"ingest   {ingest['events_per_second']:>10,.0f} events/s "
        f"({ingest['deliveries_per_second']:.0f} deliveries/s of 500)"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps({"measured_at": datetime.now(UTC).isoformat(), **results}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
