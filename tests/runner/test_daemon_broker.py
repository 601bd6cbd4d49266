"""The runner with the real broker and Postgres, when nothing breaks."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncpg

from core.commands import request_cancel
from runner.daemon import Runner
from tests.conftest import create_command, register_runner
from tests.runner.stack import BrokerProcess, fast_settings, poll, stored_events


async def test_a_cancel_from_the_database_stops_the_child(
    pool: asyncpg.Pool, broker_process: BrokerProcess, tmp_path: Path
) -> None:
    """request_cancel reaches the runner through the broker; the exit says cancelled."""
    registered = await register_runner(pool, "cancelled")
    await broker_process.start_and_wait()
    runner = Runner(
        fast_settings(broker_process.url, registered.token, tmp_path / "spool.sqlite3")
    )
    await runner.start()
    try:
        program = "import time; print('started', flush=True); time.sleep(120)"
        command_id = await create_command(
            pool, registered.id, [sys.executable, "-c", program]
        )

        async def printed() -> bool:
            events = await stored_events(pool, command_id)
            return any(e["data"] == b"started\n" for e in events)

        await poll(printed, within=60)
        async with pool.acquire() as connection:
            assert await request_cancel(connection, command_id)
        async with asyncio.timeout(60):
            await runner.wait_acknowledged(command_id)
    finally:
        await runner.stop()

    events = await stored_events(pool, command_id)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    final = events[-1]["payload"]
    assert final["status"] == "cancelled"
    assert final["reason"] == "cancelled on request; killed by SIGTERM"


async def test_a_restarted_runner_runs_a_finished_command_once(
    pool: asyncpg.Pool, broker_process: BrokerProcess, tmp_path: Path
) -> None:
    """Restarting the runner after a command ran starts no second child."""
    registered = await register_runner(pool, "restarted")
    await broker_process.start_and_wait()
    settings = fast_settings(
        broker_process.url, registered.token, tmp_path / "spool.sqlite3"
    )
    counter = tmp_path / "runs"
    program = (
        f"import sys\nopen({str(counter)!r}, 'a').write('run\\n')\nprint('done')\n"
    )
    command_id = await create_command(
        pool, registered.id, [sys.executable, "-c", program]
    )
    for _ in range(2):
        runner = Runner(settings)
        await runner.start()
        try:
            async with asyncio.timeout(60):
                await runner.wait_acknowledged(command_id)
            await asyncio.sleep(1.0)
        finally:
            await runner.stop()

    assert counter.read_text() == "run\n"
    events = await stored_events(pool, command_id)
    assert [e["kind"] for e in events] == ["status", "output", "exit"]
