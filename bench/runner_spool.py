"""Runner spool benchmark: memory with a 1 GiB backlog, and send throughput.

One run, on this machine:

1. fills a fresh spool with ``--backlog-mib`` MiB of output events of
   ``--event-bytes`` bytes each (one command), as a runner does while its
   broker is away, and times it;
2. starts ``runledger runner`` on that spool against an acknowledging sink
   (a minimal broker stand-in in its own process, so that the runner, not
   Postgres, is what is measured; ``bench.ingest`` measures the broker) and
   samples the runner's resident memory every 0.2 s until the spool is empty;
3. reports the peak and final RSS, the runner's CPU time, and the send
   throughput in events/s and MB/s of output data, from the first
   acknowledgement to the last.

Run: ``.venv/bin/python -m bench.runner_spool`` (defaults: 1024 MiB of
64 KiB events), and ``--backlog-mib 64 --event-bytes 256`` for many small
events. Results go to standard output and, as JSON, to
``bench/results/runner_spool.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from core import wire
from runner.spool import Spool

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "runner_spool.json"
MIB = 1024 * 1024
SAMPLE_SECONDS = 0.2
APPEND_BATCH = 64


def fill_spool(path: Path, backlog_bytes: int, event_bytes: int) -> dict[str, Any]:
    """Write ``backlog_bytes`` of output events into a new spool at ``path``."""
    spool = Spool.open(path, bytes_limit=2 * backlog_bytes + 64 * MIB)
    command_id = uuid.uuid4()
    spool.accept_command(command_id)
    chunk = bytes(range(256)) * (event_bytes // 256) + b"x" * (event_bytes % 256)
    events = backlog_bytes // event_bytes

    started = time.perf_counter()
    for first in range(0, events, APPEND_BATCH):
        count = min(APPEND_BATCH, events - first)
        spool.append_output(command_id, "stdout", [chunk] * count)
    spool.append(command_id, "exit", payload={"status": "succeeded"})
    seconds = time.perf_counter() - started
    spool.close()
    return {
        "events": events + 1,
        "data_bytes": events * event_bytes,
        "seconds": round(seconds, 2),
        "file_bytes": path.stat().st_size,
    }


def spooled_count(path: Path) -> int:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(connection.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        connection.close()


async def serve_sink() -> None:
    """A broker stand-in that acknowledges every event it gets, at once."""
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    limits = wire.Limits(
        max_frame_bytes=MIB, max_batch_events=1000, max_event_bytes=256 * 1024
    )

    async def session(connection: ServerConnection) -> None:
        hello = wire.Hello(uuid.uuid4(), "bench", 1, limits)
        await connection.send(wire.encode(hello), text=True)
        with contextlib.suppress(ConnectionClosed):
            await acknowledge_all(connection)

    async def acknowledge_all(connection: ServerConnection) -> None:
        async for frame in connection:
            message = wire.runner_message_decoder.decode(frame)
            if isinstance(message, wire.EventsMessage):
                acknowledged = [
                    wire.Acknowledged(e.id, e.command_id, e.sequence)  # type: ignore[arg-type]
                    for e in message.events
                ]
                await connection.send(
                    wire.encode(wire.EventAck(acknowledged=acknowledged)), text=True
                )

    async with serve(
        session, "127.0.0.1", 0, compression=None, max_size=16 * MIB
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


def start_sink() -> tuple[subprocess.Popen[bytes], str]:
    """The stand-in sink in its own process, and its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.runner_spool", "--sink"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    port = process.stdout.readline().decode().strip()
    if not port:
        raise RuntimeError("the sink did not start")
    return process, f"ws://127.0.0.1:{port}"


def drain(
    spool_path: Path, broker_url: str, token: str, workdir: Path, total: int
) -> dict[str, Any]:
    """Run the runner on the spool until it is empty; sample its memory."""
    env = {
        **os.environ,
        "RUNLEDGER_TOKEN": token,
        "RUNLEDGER_LOG_LEVEL": "WARNING",
        "RUNLEDGER_SPOOL_BYTES_LIMIT": str(2 * spool_path.stat().st_size + 64 * MIB),
    }
    with (workdir / "runner.log").open("wb") as log:
        runner = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runledger",
                "runner",
                "--broker-url",
                broker_url,
                "--spool",
                str(spool_path),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
    process = psutil.Process(runner.pid)
    samples: list[tuple[float, float, int]] = []
    started = time.perf_counter()
    first_acknowledged_at: float | None = None
    try:
        while True:
            remaining = spooled_count(spool_path)
            now = time.perf_counter() - started
            samples.append((now, process.memory_info().rss / MIB, remaining))
            if first_acknowledged_at is None and remaining < total:
                first_acknowledged_at = now
            if remaining == 0:
                break
            if runner.poll() is not None:
                raise RuntimeError(f"the runner exited; see {workdir / 'runner.log'}")
            time.sleep(SAMPLE_SECONDS)
        cpu = process.cpu_times()
    finally:
        runner.terminate()
        runner.wait(30)

    finished_at = samples[-1][0]
    rss_with_backlog = [rss for _, rss, remaining in samples if remaining > total // 2]
    return {
        "seconds_to_empty": round(finished_at, 2),
        "sending_seconds": round(finished_at - (first_acknowledged_at or 0.0), 2),
        "rss_peak_mib": round(max(rss for _, rss, _ in samples), 1),
        "rss_with_backlog_mib": round(max(rss_with_backlog or [0.0]), 1),
        "rss_last_mib": round(samples[-1][1], 1),
        "runner_cpu_seconds": round(cpu.user + cpu.system, 2),
        "samples": len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog-mib", type=int, default=1024)
    parser.add_argument("--event-bytes", type=int, default=64 * 1024)
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        asyncio.run(serve_sink())
        return

    with tempfile.TemporaryDirectory(prefix="runner-spool-bench-") as directory:
        workdir = Path(directory)
        spool_path = workdir / "spool.sqlite3"
        print(f"filling {args.backlog_mib} MiB of {args.event_bytes}-byte events ...")
        filled = fill_spool(spool_path, args.backlog_mib * MIB, args.event_bytes)
        print(f"  {filled}")

        sink, sink_url = start_sink()
        try:
            print(f"draining into the sink at {sink_url} ...")
            drained = drain(
                spool_path, sink_url, "rlr_bench", workdir, filled["events"]
            )
        finally:
            sink.terminate()
            sink.wait(10)

    seconds = drained["sending_seconds"] or drained["seconds_to_empty"]
    result = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "backlog_mib": args.backlog_mib,
        "event_bytes": args.event_bytes,
        "target": "stand-in sink",
        "fill": filled,
        "drain": drained,
        "events_per_second": round(filled["events"] / seconds),
        "megabytes_per_second": round(filled["data_bytes"] / seconds / 1e6, 1),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    runs.append(result)
    RESULTS.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
