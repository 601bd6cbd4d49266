"""``runledger broker``: flags, the address it prints, a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

from tests.broker.conftest import RunnerWithCommand
from tests.broker.wire_client import WireRunner

ROOT = Path(__file__).resolve().parents[2]

# The broker's own subcommand, without the rest of the runledger command line.
RUN_BROKER = """
import argparse, sys
from broker import cli
parser = argparse.ArgumentParser(prog="runledger")
cli.register(parser.add_subparsers())
arguments = parser.parse_args(sys.argv[1:])
sys.exit(arguments.handler(arguments))
"""


async def test_broker_command_prints_its_address_and_stops_on_sigterm(
    database_url: str, alpha: RunnerWithCommand
) -> None:
    """The command listens where its flags say, prints the URL, and exits 0 on TERM."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        RUN_BROKER,
        "broker",
        "--port",
        "0",
        "--max-batch-events",
        "7",
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(60):
            while True:
                line = (await process.stderr.readline()).decode()
                assert line, "the broker exited before listening"
                address = re.search(r"listening on (ws://127\.0\.0\.1:\d+)", line)
                if address:
                    break

        runner = await WireRunner.connect(address.group(1), alpha.token)
        assert runner.hello.limits.max_batch_events == 7
        await runner.close()

        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await process.stderr.read()
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
