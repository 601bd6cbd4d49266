"""runledger's delivery to the web tier, and emit to visible through the API.

``run_delivery``: the workload is already stored (written by COPY, as if
ingested); a relay forwards it to the web tier's ingest endpoint, which
verifies each signed batch and applies it to the commands' summaries. The
figure is how fast the backlog drains.

``run_visible``: the whole stack (broker, relay, web tier) while 10 runner
connections emit events at a steady 5,000 events/s, and one reader per
command follows its log through ``GET /api/commands/{id}/events`` with a
long poll, as the live log page does. An event's latency runs from its
``emitted_at`` (set by the runner when it makes the event) to the moment a
reader has it. The same run also gives stored-to-delivered latency, from
each event's ``stored_at`` to the ``delivered_at`` of the delivery that
carried it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from datetime import datetime

import asyncpg
import msgspec

from bench.compare.fleet import FleetRunner, WireRunner, encode_event, prepare_fleet
from bench.compare.ingest import BROKER_OVERRIDES, wait_delivered
from bench.compare.measure import (
    ResourceMonitor,
    Result,
    Workload,
    fixed_pids,
    own_process,
    percentile,
    postgres_backends,
)
from bench.compare.processes import (
    ProcessGroup,
    ServerProcess,
    python_module,
    start_server_process,
)
from bench.compare.scratch import scratch_database
from core.tokens import new_token

VISIBLE_RATE = 5000
VISIBLE_CONNECTIONS = 10
SEND_INTERVAL_SECONDS = 0.02
LONG_POLL_SECONDS = 5
DRAIN_TIMEOUT_SECONDS = 600.0


async def _start(kind: str, url: str, settings: dict[str, object]) -> ServerProcess:
    return await start_server_process(
        kind,
        python_module(
            "bench.compare.serve",
            kind,
            "--database-url",
            url,
            "--settings",
            json.dumps(settings),
        ),
    )


async def _start_web(url: str) -> tuple[ServerProcess, str, str]:
    """The web tier; returns it, the signing secret and the API token."""
    secret = secrets.token_urlsafe(32)
    api_token = new_token("rla_")
    web = await _start("web", url, {"signing_secret": secret, "api_token": api_token})
    return web, secret, api_token


async def _start_relay(url: str, web: ServerProcess, secret: str) -> ServerProcess:
    """A relay delivering to ``web``'s ingest endpoint."""
    return await _start(
        "relay",
        url,
        {
            "sink_url": f"http://127.0.0.1:{web.port}/api/runner/events",
            "signing_secret": secret,
            "relay_metrics_port": 0,
        },
    )


async def _store_directly(url: str, fleet: list[FleetRunner]) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.copy_records_to_table(
            "events",
            records=[
                (e.command_id, e.sequence, e.id, "output", "stdout", e.data)
                for runner in fleet
                for e in runner.events
            ],
            columns=("command_id", "sequence", "id", "kind", "stream", "data"),
        )
    finally:
        await connection.close()


async def run_delivery(workload: Workload) -> Result:
    """Drain a stored backlog through the relay into the web tier."""
    async with scratch_database("delivery") as (name, url), ProcessGroup() as group:
        fleet = await prepare_fleet(url, workload, 1)
        await _store_directly(url, fleet)
        web, secret, _ = await _start_web(url)
        group.add(web)
        # The clock starts with the relay, which begins on the backlog at once.
        started = time.perf_counter()
        relay = await _start_relay(url, web, secret)
        group.add(relay)
        monitor = ResourceMonitor(
            {
                "relay": fixed_pids(relay.pid),
                "web": fixed_pids(web.pid),
                "postgres": postgres_backends(name),
            }
        )
        with monitor:
            await wait_delivered(url, workload.events_total, DRAIN_TIMEOUT_SECONDS)
            seconds = time.perf_counter() - started

    result = Result(
        scenario="runledger stored to delivered (backlog)",
        system="runledger",
        durability="web tier applies in its own commit",
        events=workload.events_total,
        seconds=seconds,
        notes="relay (5 workers, batches of up to 500) to the web tier's ingest",
        group="delivery",
    )
    monitor.fill(result)
    return result


class _PageEvent(msgspec.Struct):
    emitted_at: datetime | None = None


class _Page(msgspec.Struct):
    events: list[_PageEvent]
    next_after: int


_page_decoder = msgspec.json.Decoder(_Page)


class LogReader:
    """Follows one command's log through the read API, like the live page.

    It speaks plain HTTP/1.1 on one kept-alive connection and decodes only
    the fields it needs, so the reader costs little CPU beside the servers.
    """

    def __init__(self, port: int, token: str, command_id: uuid.UUID, total: int):
        self.port = port
        self.token = token
        self.command_id = command_id
        self.total = total
        self.latencies_ms: list[float] = []

    async def follow(self) -> None:
        """Read until ``total`` events were seen; reconnect if the server closes."""
        after = 0
        while after < self.total:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                while after < self.total:
                    body = await self._get(reader, writer, after)
                    if body is None:
                        break
                    seen_at = time.time()
                    page = _page_decoder.decode(body)
                    for event in page.events:
                        if event.emitted_at is not None:
                            emitted = event.emitted_at.timestamp()
                            self.latencies_ms.append(1000 * (seen_at - emitted))
                    after = page.next_after
            finally:
                writer.close()

    async def _get(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, after: int
    ) -> bytes | None:
        path = (
            f"/api/commands/{self.command_id}/events"
            f"?after={after}&limit=1000&wait={LONG_POLL_SECONDS}"
        )
        writer.write(
            f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"authorization: Bearer {self.token}\r\n\r\n".encode()
        )
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        status = int(head.split(b" ", 2)[1])
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        body = await (_read_chunked(reader) if chunked else reader.readexactly(length))
        if status != 200:
            raise RuntimeError(f"read API answered {status}: {body[:200]!r}")
        return body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(body)
        body.extend(await reader.readexactly(size))
        await reader.readexactly(2)


class PacedRunner(WireRunner):
    """A runner that emits its events at a steady rate, stamped when made."""

    def __init__(self, broker_url: str, runner: FleetRunner, rate: float) -> None:
        super().__init__(broker_url, runner)
        self.rate = rate

    async def run_paced(self) -> None:
        events = self.runner.events
        per_frame = max(1, round(self.rate * SEND_INTERVAL_SECONDS))
        encoded: list[bytes] = []
        started = time.perf_counter()

        async def stamped() -> list[bytes]:
            # Events are made (and stamped) only when their time comes.
            for index in range(0, len(events), per_frame):
                due = started + (index / per_frame) * SEND_INTERVAL_SECONDS
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                now = time.time()
                encoded.extend(
                    encode_event(e, emitted_at=now)
                    for e in events[index : index + per_frame]
                )
                self._room.set()
            return encoded

        producer = asyncio.create_task(stamped())
        await self.run(encoded, produced=producer)


async def run_visible(
    workload: Workload, seconds: float, reader_count: int
) -> list[Result]:
    """5,000 events/s through the whole stack, ``reader_count`` logs followed.

    The readers follow commands spread evenly over the workload's (every
    command when ``reader_count`` equals the number of commands).
    """
    total = min(workload.events_total, int(VISIBLE_RATE * seconds))
    workload = Workload(total, workload.commands)
    async with scratch_database("visible") as (name, url), ProcessGroup() as group:
        fleet = await prepare_fleet(url, workload, VISIBLE_CONNECTIONS)
        broker = await _start("broker", url, {**BROKER_OVERRIDES})
        group.add(broker)
        web, secret, api_token = await _start_web(url)
        group.add(web)
        relay = await _start_relay(url, web, secret)
        group.add(relay)
        per_command: dict[uuid.UUID, int] = {}
        for runner in fleet:
            for event in runner.events:
                per_command[event.command_id] = per_command.get(event.command_id, 0) + 1
        monitor = ResourceMonitor(
            {
                "load": own_process,
                "broker": fixed_pids(broker.pid),
                "relay": fixed_pids(relay.pid),
                "web": fixed_pids(web.pid),
                "postgres": postgres_backends(name),
            }
        )
        followed = list(per_command.items())[
            :: max(1, len(per_command) // reader_count)
        ]
        readers = [LogReader(web.port, api_token, c, n) for c, n in followed]
        runners = [
            PacedRunner(
                f"ws://127.0.0.1:{broker.port}", runner, VISIBLE_RATE / len(fleet)
            )
            for runner in fleet
        ]
        with monitor:
            started = time.perf_counter()
            following = asyncio.gather(*(r.follow() for r in readers))
            await asyncio.wait_for(
                asyncio.gather(*(r.run_paced() for r in runners)),
                DRAIN_TIMEOUT_SECONDS,
            )
            await asyncio.wait_for(following, DRAIN_TIMEOUT_SECONDS)
            elapsed = time.perf_counter() - started
            await wait_delivered(url, total, DRAIN_TIMEOUT_SECONDS)
        delivered_latencies = await _stored_to_delivered_ms(url)
        stored_latencies = await _emitted_to_stored_ms(url)

    visible = Result(
        scenario=(
            f"runledger emit to visible, {VISIBLE_RATE:,} events/s, "
            f"{len(readers)} readers"
        ),
        system="runledger",
        durability="fsync at each commit, acknowledged after COMMIT",
        events=total,
        seconds=elapsed,
        latencies_ms=[ms for r in readers for ms in r.latencies_ms],
        notes=(
            f"{VISIBLE_CONNECTIONS} runner connections paced to {VISIBLE_RATE}/s, "
            f"{len(readers)} long-poll readers; broker, relay and web tier running"
        ),
        group="delivery",
    )
    monitor.fill(visible)
    visible.parameters = {
        "emitted_to_stored_p50_ms": round(percentile(stored_latencies, 0.5), 1),
        "emitted_to_stored_p99_ms": round(percentile(stored_latencies, 0.99), 1),
    }
    delivered = Result(
        scenario=(
            f"runledger stored to delivered, {VISIBLE_RATE:,} events/s, "
            f"{len(readers)} readers"
        ),
        system="runledger",
        durability="web tier applies in its own commit",
        events=total,
        seconds=elapsed,
        latencies_ms=delivered_latencies,
        notes="same run; latency from stored_at to the delivery's delivered_at",
        group="delivery",
    )
    delivered.cpu_percent = visible.cpu_percent
    delivered.peak_rss_mib = visible.peak_rss_mib
    return [visible, delivered]


async def _emitted_to_stored_ms(url: str) -> list[float]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT 1000 * extract(epoch FROM stored_at - emitted_at) AS ms FROM events"
        )
    finally:
        await connection.close()
    return [float(row["ms"]) for row in rows]


async def _stored_to_delivered_ms(url: str) -> list[float]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT 1000 * extract(epoch FROM d.delivered_at - e.stored_at) AS ms"
            " FROM events AS e JOIN deliveries AS d ON d.command_id = e.command_id"
            " AND e.sequence BETWEEN d.first_sequence AND d.last_sequence"
        )
    finally:
        await connection.close()
    return [float(row["ms"]) for row in rows]
