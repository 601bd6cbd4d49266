"""``runledger web``: flags, the printed address, a clean stop on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import httpx
import pytest

from tests.web.conftest import SIGNING_SECRET
from web.cli import register

pytestmark = pytest.mark.slow


def test_register_adds_web_with_host_and_port() -> None:
    """The subcommand takes --host and --port and names its handler."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["web", "--host", "127.0.0.2", "--port", "0"])
    assert (args.host, args.port) == ("127.0.0.2", 0)
    assert callable(args.handler)


async def test_serves_prints_its_address_and_stops_on_sigterm(
    database_url: str,
) -> None:
    """The command prints where it listens, serves there, and exits 0 on SIGTERM."""
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "RUNLEDGER_SIGNING_SECRET": SIGNING_SECRET,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runledger",
        "web",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=environment,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        assert line.startswith("runledger web listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1].strip()
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{url}/healthz")).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
    assert code == 0


async def test_missing_secret_exits_with_a_message(database_url: str) -> None:
    """Without the signing secret the command says what to set and exits 1."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key != "RUNLEDGER_SIGNING_SECRET"
    }
    environment["DATABASE_URL"] = database_url
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runledger",
        "web",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=environment,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert b"RUNLEDGER_SIGNING_SECRET" in output
