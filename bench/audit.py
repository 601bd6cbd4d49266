"""Audit and retention benchmark: how long the audit views take, how fast
retention removes rows, and how long one of its batches holds its locks.

One run, on one scratch database:

1. ``--commands`` commands of ``--events-per-command`` output events
   (~200 bytes each) are stored, delivered in batches of 100, and finished 40
   days ago; ``--pending-commands`` more are running with their last 100
   events undelivered;
2. each audit query is timed (best of three): the system view, the runners
   view, counts over the commands view, one command by id, and
   ``audit_delivery_lag`` over all deliveries; then everything ``runledger
   audit`` reads, once;
3. one retention pass with the default settings (batches of 1000 rows) is
   timed; the rate is events removed per second and the longest batch is
   the longest any lock was held.

Run: ``PGHOST=127.0.0.1 .venv/bin/python -m bench.audit``. Results go to
standard output and, as JSON, to ``bench/results/audit.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import asyncpg

from core.database import database_url_from_env
from core.migrate import upgrade
from core.retention import PruneProgress, RetentionSettings, prune_once
from runledger.audit import run_audit

RESULTS = Path(__file__).parent / "results" / "audit.json"

FILL = """
WITH new_commands AS (
    INSERT INTO commands (runner_id, argv, status, finished_at)
    SELECT $1, '["make"]', $4, CASE WHEN $4 = 'running' THEN NULL
                                    ELSE now() - interval '40 days' END
    FROM generate_series(1, $2)
    RETURNING id
), relay_state AS (
    INSERT INTO command_delivery (command_id, state)
    SELECT id, CASE WHEN $4 = 'running' THEN 'active' ELSE 'finished' END
    FROM new_commands
), stored AS (
    INSERT INTO events (command_id, sequence, id, kind, stream, data, stored_at)
    SELECT c.id, s, gen_random_uuid(), 'output', 'stdout', $5,
           now() - interval '40 days' + s * interval '1 ms'
    FROM new_commands AS c, generate_series(1, $3) AS s
)
INSERT INTO deliveries (command_id, delivery_id, first_sequence, last_sequence,
                        event_count, delivered_at)
SELECT c.id, c.id || ':' || b, b * 100 + 1, b * 100 + 100, 100,
       now() - interval '40 days' + (b * 100 + 100) * interval '1 ms'
           + interval '150 ms'
FROM new_commands AS c,
     generate_series(0, $3 / 100 - 1 - CASE WHEN $4 = 'running' THEN 1 ELSE 0 END)
         AS b
"""

AUDIT_QUERIES = {
    "audit_system": "SELECT * FROM audit_system",
    "audit_runners": "SELECT * FROM audit_runners",
    "problem counts (audit_commands)": (
        "SELECT count(*) FILTER (WHERE lost), count(*) FILTER (WHERE dead), "
        "count(*) FILTER (WHERE oldest_pending_age > interval '5 minutes') "
        "FROM audit_commands"
    ),
    "one command by id": (
        "SELECT * FROM audit_commands WHERE command_id = "
        "(SELECT id FROM commands ORDER BY created_at LIMIT 1)"
    ),
    "a day of audit_delivery_lag (all)": (
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY delivery_lag), "
        "max(delivery_lag) FROM audit_delivery_lag "
        "WHERE delivered_at >= now() - interval '41 days' "
        "AND delivered_at < now() - interval '39 days'"
    ),
}


def _scratch_url(base: str, name: str) -> str:
    parsed = urlparse(base)
    return urlunparse(parsed._replace(path="/" + name))


async def _time_best_of_three(pool: asyncpg.Pool, sql: str) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        await pool.fetch(sql)
        best = min(best, time.perf_counter() - started)
    return best


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = database_url_from_env()
    if base is None:
        raise SystemExit("set DATABASE_URL or PGHOST to a server the bench may use")
    name = f"runledger_bench_audit_{os.getpid()}"
    admin = await asyncpg.connect(base)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = _scratch_url(base, name)
    try:
        await asyncio.to_thread(upgrade, url)
        pool = await asyncpg.create_pool(url, min_size=2, max_size=4)
        try:
            return await _measure(pool, args)
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _measure(pool: asyncpg.Pool, args: argparse.Namespace) -> dict[str, Any]:
    runner_id = await pool.fetchval(
        "INSERT INTO runners (name, token_hash) VALUES ('bench', 'bench') RETURNING id"
    )
    payload = b"x" * 200
    started = time.perf_counter()
    await pool.execute(
        FILL, runner_id, args.commands, args.events_per_command, "succeeded", payload
    )
    await pool.execute(
        FILL,
        runner_id,
        args.pending_commands,
        args.events_per_command,
        "running",
        payload,
    )
    await pool.execute("VACUUM ANALYZE")
    events = await pool.fetchval("SELECT count(*) FROM events")
    print(f"stored {events:,} events in {time.perf_counter() - started:.1f} s")

    timings = {}
    for label, sql in AUDIT_QUERIES.items():
        timings[label] = await _time_best_of_three(pool, sql)
        print(f"{label:>34}: {timings[label] * 1000:9.1f} ms")

    started = time.perf_counter()
    await run_audit(pool, timedelta(minutes=5))
    label = "runledger audit (all of it)"
    timings[label] = time.perf_counter() - started
    print(f"{label:>34}: {timings[label] * 1000:9.1f} ms")

    # Retention: time every batch by the gap between progress reports.
    batch_seconds: list[float] = []
    last = time.perf_counter()

    def on_progress(update: PruneProgress) -> None:
        nonlocal last
        now = time.perf_counter()
        if update.step not in ("kept", "done"):
            batch_seconds.append(now - last)
        last = now

    started = time.perf_counter()
    report = await prune_once(pool, RetentionSettings(), on_progress)
    elapsed = time.perf_counter() - started
    rate = report.events_removed / elapsed
    print(
        f"retention: {report.events_removed:,} events of {report.commands_pruned:,} "
        f"commands in {elapsed:.1f} s ({rate:,.0f} events/s), "
        f"{report.batches:,} batches, longest {max(batch_seconds) * 1000:.0f} ms"
    )

    return {
        "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "events": events,
        "commands": args.commands + args.pending_commands,
        "audit_query_seconds": timings,
        "retention": {
            "events_removed": report.events_removed,
            "commands_pruned": report.commands_pruned,
            "seconds": elapsed,
            "events_per_second": rate,
            "batches": report.batches,
            "longest_batch_seconds": max(batch_seconds),
            "median_batch_seconds": sorted(batch_seconds)[len(batch_seconds) // 2],
        },
        "retention_cutoff": str(timedelta(days=RetentionSettings().retention_days)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=500)
    parser.add_argument("--pending-commands", type=int, default=20)
    parser.add_argument("--events-per-command", type=int, default=1000)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
