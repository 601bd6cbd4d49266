"""``runledger runner``: adding a runner, the status line, ``--status``."""

from __future__ import annotations

import argparse
import asyncio
import io
import uuid
from pathlib import Path

import asyncpg
import pytest

from core.errors import ConfigurationError
from core.tokens import token_matches
from runner import cli
from runner.spool import Spool
from runner.status import status_line
from tests.runner.conftest import StandInBroker, runner_settings


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="runledger")
    cli.register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_runner_add_stores_only_the_hash_and_prints_the_token(
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`runner add NAME` makes a runner row whose hash matches the printed token."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    args = parse("runner", "add", "laptop")
    assert args.handler(args) == 0

    printed = capsys.readouterr().out
    token = next(line for line in printed.splitlines() if line.startswith("rlr_"))

    async def stored() -> asyncpg.Record:
        connection = await asyncpg.connect(database_url)
        try:
            return await connection.fetchrow(
                "SELECT id, token_hash FROM runners WHERE name = 'laptop'"
            )
        finally:
            await connection.close()

    row = asyncio.run(stored())
    assert str(row["id"]) in printed
    assert token_matches(token, row["token_hash"])
    assert token not in row["token_hash"]


def test_runner_add_refuses_a_taken_name(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second runner with the same name is a clear error, not a second row."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    args = parse("runner", "add", "twice")
    args.handler(args)
    with pytest.raises(cli.RunnerNameTaken, match="already exists"):
        args.handler(args)


def test_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags win over RUNLEDGER_* variables; the token may come from the environment."""
    monkeypatch.setenv("RUNLEDGER_TOKEN", "rlr_from_env")
    monkeypatch.setenv("RUNLEDGER_BROKER_URL", "ws://127.0.0.1:1")
    args = parse(
        "runner", "--broker-url", "wss://broker.example:443", "--spool", "x.db"
    )
    settings = cli.settings_from(args)
    assert settings.broker_url == "wss://broker.example:443"
    assert settings.token == "rlr_from_env"
    assert settings.spool_path == Path("x.db")


def test_running_without_a_token_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No token anywhere is a configuration error naming runner add."""
    monkeypatch.delenv("RUNLEDGER_TOKEN", raising=False)
    args = parse("runner")
    with pytest.raises(ConfigurationError, match="runledger runner add"):
        args.handler(args)


def test_status_reads_the_spool_of_a_stopped_runner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`runner --status` prints running, spooled, unacknowledged and refused figures."""
    path = tmp_path / "spool.sqlite3"
    spool = Spool.open(path, bytes_limit=1_000_000)
    command_id = uuid.uuid4()
    spool.accept_command(command_id)
    for _ in range(4):
        spool.append(command_id, "output", stream="stdout", data=b"x" * 1000)
    refused = spool.append(command_id, "output", stream="stderr", data=b"y")
    spool.refuse(refused.id, None, None, "too_large", "over the limit")
    spool.close()

    args = parse("runner", "--status", "--spool", str(path))
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "connected: no" in printed
    assert "running: 1 " in printed
    assert "spooled: 4 events" in printed
    assert "unacknowledged: 4" in printed
    assert "refused: 1" in printed
    assert "too_large: over the limit" in printed


async def test_the_live_status_line_is_drawn_on_a_terminal(
    broker: StandInBroker, tmp_path: Path
) -> None:
    """On a terminal the daemon redraws one status line in place."""
    terminal = io.StringIO()
    settings = runner_settings(broker, tmp_path / "spool.sqlite3")
    serving = asyncio.create_task(cli.serve(settings, terminal))
    await broker.wait_for(lambda: "\x1b[Kconnected |" in terminal.getvalue())
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    drawn = terminal.getvalue()
    assert drawn.startswith("\r\x1b[K")
    assert "running 0 | spooled 0 (0 B) | unacknowledged 0 | refused 0" in drawn


def test_status_line_wording() -> None:
    """The status line names each figure."""
    from runner.daemon import RunnerState

    line = status_line(RunnerState(False, 2, 10, 2048, 3, 1))
    assert line == (
        "disconnected | running 2 | spooled 10 (2.0 KiB) | unacknowledged 3 | refused 1"
    )


def test_status_says_when_a_runner_holds_the_spool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`runner --status` on a spool in use says a runner is running on it."""
    path = tmp_path / "spool.sqlite3"
    spool = Spool.open(path, bytes_limit=1_000_000)
    try:
        args = parse("runner", "--status", "--spool", str(path))
        assert args.handler(args) == 0
    finally:
        spool.close()
    printed = capsys.readouterr().out
    assert "a runner is using this spool now" in printed
    assert "connected: no" not in printed
