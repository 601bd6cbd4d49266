"""The runner against the real broker and Postgres, under faults.

Each test pins one promise of the runner: what the child wrote reaches the
events table exactly once, in order and byte for byte, whatever breaks in
between (the broker killed, the runner killed, the network cut or stalled,
Postgres stalled), while memory stays bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from runner.daemon import Runner
from tests.conftest import create_command, register_runner
from tests.runner.stack import (
    BrokerProcess,
    RunnerProcess,
    TcpProxy,
    fast_settings,
    poll,
    process_gone,
    stored_count,
    stored_events,
)

pytestmark = pytest.mark.slow

MIB = 1024 * 1024


def assert_complete_log(
    events: list[dict[str, Any]], expected_stdout: bytes, expected_stderr: bytes = b""
) -> None:
    """Sequences 1..n once each, status first, exit last, streams byte-exact."""
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["id"] for e in events}) == len(events)
    assert events[0]["kind"] == "status"
    assert events[-1]["kind"] == "exit"
    stdout = b"".join(e["data"] for e in events if e["stream"] == "stdout")
    stderr = b"".join(e["data"] for e in events if e["stream"] == "stderr")
    assert len(stdout) == len(expected_stdout)
    assert stdout == expected_stdout
    assert stderr == expected_stderr
    streams = events[-1]["payload"]["streams"]
    assert streams["stdout"]["sha256"] == hashlib.sha256(expected_stdout).hexdigest()


# 50,000 lines of exactly 64 bytes, written as fast as the pipe takes them.
FIFTY_THOUSAND_LINES = (
    "import sys\n"
    "out = sys.stdout.buffer\n"
    "for i in range(50_000):\n"
    "    out.write(b'%063d\\n' % i)\n"
)
FIFTY_THOUSAND_EXPECTED = b"".join(b"%063d\n" % i for i in range(50_000))


async def test_broker_killed_mid_stream_loses_and_repeats_nothing(
    pool: asyncpg.Pool, broker_process: BrokerProcess, tmp_path: Path
) -> None:
    """Broker SIGKILLed during 50,000 events, back 3 s later: all stored once."""
    registered = await register_runner(pool, "broker-killed")
    await broker_process.start_and_wait()
    runner = Runner(
        fast_settings(
            broker_process.url,
            registered.token,
            tmp_path / "spool.sqlite3",
            chunk_bytes=64,
            window_events=5000,
        )
    )
    await runner.start()
    try:
        command_id = await create_command(
            pool, registered.id, [sys.executable, "-c", FIFTY_THOUSAND_LINES]
        )
        stored_at_kill = await poll(
            lambda: _at_least(pool, command_id, 5_000), within=120, every=0.05
        )
        broker_process.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(3)
        await broker_process.start_and_wait()

        async with asyncio.timeout(240):
            await runner.wait_acknowledged(command_id)
        resumed_after = time.monotonic() - killed_at
    finally:
        await runner.stop()

    events = await stored_events(pool, command_id)
    assert stored_at_kill < len(events), "the broker was killed after the stream ended"
    assert len(events) == 50_002
    assert_complete_log(events, FIFTY_THOUSAND_EXPECTED)
    assert events[-1]["payload"]["status"] == "succeeded"
    assert resumed_after < 240


async def _at_least(pool: asyncpg.Pool, command_id: uuid.UUID, count: int) -> int:
    stored = await stored_count(pool, command_id)
    return stored if stored >= count else 0


def spooled_stdout_bytes(spool_path: Path, command_id: uuid.UUID) -> int:
    """Bytes of stdout the runner had taken from the child, read from its spool."""
    connection = sqlite3.connect(f"file:{spool_path}?mode=ro", uri=True)
    try:
        row = connection.execute(
            "SELECT stdout_bytes FROM commands WHERE command_id = ?", (str(command_id),)
        ).fetchone()
    finally:
        connection.close()
    return int(row[0])


# Numbered lines, paced so the command is still running when the runner dies.
PACED_LINES = (
    "import sys, time\n"
    "out = sys.stdout.buffer\n"
    "for i in range(1_000_000):\n"
    "    out.write(b'%031d\\n' % i)\n"
    "    if i % 2000 == 0:\n"
    "        out.flush()\n"
    "        time.sleep(0.01)\n"
)
PACED_EXPECTED = b"".join(b"%031d\n" % i for i in range(1_000_000))


async def test_runner_killed_mid_stream_ends_the_command_as_lost(
    pool: asyncpg.Pool, broker_process: BrokerProcess, tmp_path: Path
) -> None:
    """Runner SIGKILLed mid-stream and restarted: all it took stored once, then lost."""
    registered = await register_runner(pool, "runner-killed")
    await broker_process.start_and_wait()
    spool_path = tmp_path / "spool.sqlite3"
    settings = {"chunk_bytes": 4096, "reconnect_initial": 0.2}

    first = RunnerProcess(
        broker_process.url,
        registered.token,
        spool_path,
        tmp_path / "r1.log",
        **settings,
    )
    first.start()
    try:
        command_id = await create_command(
            pool, registered.id, [sys.executable, "-c", PACED_LINES]
        )
        await poll(lambda: _at_least(pool, command_id, 200), within=120)
    finally:
        first.kill()
    events_before_restart = await stored_events(pool, command_id)
    child_pid = events_before_restart[0]["payload"]["pid"]

    # The kernel kills the child with its runner (it cannot write into a void).
    await poll(lambda: process_gone(child_pid), within=30)
    taken_from_child = spooled_stdout_bytes(spool_path, command_id)
    assert taken_from_child > 0

    second = RunnerProcess(
        broker_process.url,
        registered.token,
        spool_path,
        tmp_path / "r2.log",
        **settings,
    )
    second.start()
    try:
        await poll(lambda: _has_exit(pool, command_id), within=120, every=0.2)
    finally:
        second.terminate()

    events = await stored_events(pool, command_id)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert len(events) > len(events_before_restart)
    stdout = b"".join(e["data"] for e in events if e["stream"] == "stdout")
    assert len(stdout) == taken_from_child
    assert stdout == PACED_EXPECTED[:taken_from_child]

    final = events[-1]
    assert final["kind"] == "exit"
    assert final["payload"]["status"] == "lost"
    assert f"pid {child_pid}" in final["payload"]["reason"]
    assert final["payload"]["streams"]["stdout"]["bytes"] == taken_from_child


async def _has_exit(pool: asyncpg.Pool, command_id: uuid.UUID) -> bool:
    found = await pool.fetchval(
        "SELECT 1 FROM events WHERE command_id = $1 AND kind = 'exit'", command_id
    )
    return found is not None


# About 8 MB over about 8 s: long enough to cut the network in the middle.
SLOW_STREAM = (
    "import sys, time\n"
    "out = sys.stdout.buffer\n"
    "for i in range(250_000):\n"
    "    out.write(b'%031d\\n' % i)\n"
    "    if i % 3000 == 0:\n"
    "        out.flush()\n"
    "        time.sleep(0.1)\n"
)
SLOW_EXPECTED = b"".join(b"%031d\n" % i for i in range(250_000))


@pytest.mark.parametrize("fault", ["drop", "stall"])
async def test_a_cut_or_stalled_network_is_detected_and_healed(
    fault: str, pool: asyncpg.Pool, broker_process: BrokerProcess, tmp_path: Path
) -> None:
    """A dropped or silently stalled connection is noticed, replaced, all delivered."""
    registered = await register_runner(pool, f"network-{fault}")
    await broker_process.start_and_wait()
    proxy = TcpProxy(broker_process.port)
    await proxy.start()
    runner = Runner(
        fast_settings(proxy.url, registered.token, tmp_path / "spool.sqlite3")
    )
    await runner.start()
    try:
        await runner.wait_connected()
        command_id = await create_command(
            pool, registered.id, [sys.executable, "-c", SLOW_STREAM]
        )
        await poll(lambda: _at_least(pool, command_id, 20), within=60)

        broken_at = time.monotonic()
        if fault == "drop":
            proxy.drop()
        else:
            proxy.stall()
        await poll(lambda: proxy.accepted >= 2 and runner.state().connected, within=30)
        noticed_after = time.monotonic() - broken_at
        stored_then = await stored_count(pool, command_id)

        async with asyncio.timeout(120):
            await runner.wait_acknowledged(command_id)
    finally:
        await runner.stop()
        await proxy.stop()

    events = await stored_events(pool, command_id)
    assert stored_then < len(events), "the stream ended before the fault"
    assert_complete_log(events, SLOW_EXPECTED)
    # Keepalive: ping every 1 s, 2 s without a pong counts as dead.
    assert noticed_after < 15


def rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / MIB


# 128 MiB written as fast as the pipe takes it.
FLOOD_BYTES = 128 * MIB
FLOOD = (
    "import sys\n"
    "block = bytes(range(256)) * 256\n"
    f"for _ in range({FLOOD_BYTES} // len(block)):\n"
    "    sys.stdout.buffer.write(block)\n"
)
LOCK_SECONDS = 30.0
RUNNER_RSS_LIMIT_MIB = 150
BROKER_RSS_LIMIT_MIB = 400
RSS_GROWTH_LIMIT_MIB = 40


async def test_a_stalled_database_slows_the_child_with_bounded_memory(
    pool: asyncpg.Pool, broker_process: BrokerProcess, tmp_path: Path
) -> None:
    """With the events table locked for 30 s, memory stays flat and the child waits."""
    registered = await register_runner(pool, "database-stalled")
    await broker_process.start_and_wait()
    spool_path = tmp_path / "spool.sqlite3"
    runner = RunnerProcess(
        broker_process.url,
        registered.token,
        spool_path,
        tmp_path / "runner.log",
        spool_bytes_limit=16 * MIB,
        reconnect_initial=0.2,
    )
    runner.start()
    try:
        command_id = await create_command(
            pool, registered.id, [sys.executable, "-c", FLOOD]
        )
        await poll(lambda: _at_least(pool, command_id, 10), within=60)

        async with pool.acquire() as locker, locker.transaction():
            await locker.execute("LOCK TABLE events IN EXCLUSIVE MODE")
            locked_at = time.monotonic()

            # Let the spool fill up to its budget, then watch for 20 s.
            await asyncio.sleep(8)
            taken_early = spooled_stdout_bytes(spool_path, command_id)
            runner_early = rss_mib(runner.pid)
            broker_early = rss_mib(broker_process.pid)
            await asyncio.sleep(LOCK_SECONDS - 8)
            taken_late = spooled_stdout_bytes(spool_path, command_id)
            runner_late = rss_mib(runner.pid)
            broker_late = rss_mib(broker_process.pid)
            held_for = time.monotonic() - locked_at

        print(
            f"runner RSS {runner_early:.0f} -> {runner_late:.0f} MiB, "
            f"broker RSS {broker_early:.0f} -> {broker_late:.0f} MiB, "
            f"child output taken {taken_early} -> {taken_late} bytes "
            f"during a {held_for:.0f} s lock"
        )
        # The child was held back: the runner took in at most the spool budget.
        assert taken_late - taken_early < 2 * MIB
        assert taken_late < FLOOD_BYTES // 2
        assert runner_late < RUNNER_RSS_LIMIT_MIB
        assert broker_late < BROKER_RSS_LIMIT_MIB
        assert runner_late - runner_early < RSS_GROWTH_LIMIT_MIB
        assert broker_late - broker_early < RSS_GROWTH_LIMIT_MIB

        await poll(lambda: _has_exit(pool, command_id), within=240, every=0.5)
    finally:
        runner.terminate()

    # Read the log back in pages, so the test itself stays small too.
    digest = hashlib.sha256()
    total = 0
    sequences = 0
    last = 0
    while True:
        rows = await pool.fetch(
            "SELECT sequence, stream, data, kind, payload FROM events"
            " WHERE command_id = $1 AND sequence > $2 ORDER BY sequence LIMIT 500",
            command_id,
            last,
        )
        if not rows:
            break
        for row in rows:
            sequences += 1
            assert row["sequence"] == sequences
            if row["stream"] == "stdout":
                digest.update(row["data"])
                total += len(row["data"])
            last = row["sequence"]
    expected = hashlib.sha256()
    block = bytes(range(256)) * 256
    for _ in range(FLOOD_BYTES // len(block)):
        expected.update(block)
    assert total == FLOOD_BYTES
    assert digest.hexdigest() == expected.hexdigest()
