"""``runledger runner``: run the daemon, show its spool, or add a runner.

::

    runledger runner [--broker-url URL] [--token TOKEN] [--spool PATH] ...
    runledger runner --status [--spool PATH]
    runledger runner add NAME
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

import asyncpg

from core.database import Queries, connect, database_url_from_env
from core.embedded import start_embedded_postgres
from core.errors import ConfigurationError, RunledgerError
from core.logging import get_logger
from core.loop import run_event_loop
from core.settings import load_settings
from core.tokens import hash_token, new_token
from runner.daemon import Runner
from runner.settings import RunnerSettings
from runner.status import offline_report, status_line

log = get_logger("runner")

queries = Queries(Path(__file__).parent / "sql" / "runners.sql")

STATUS_LINE_SECONDS = 0.5

# Flags that map one to one onto RunnerSettings fields.
_FLAGS: list[tuple[str, str, Any]] = [
    ("--broker-url", "broker_url", str),
    ("--token", "token", str),
    ("--spool", "spool_path", Path),
    ("--spool-bytes-limit", "spool_bytes_limit", int),
    ("--ca-bundle", "ca_bundle", Path),
    ("--acknowledge-timeout", "acknowledge_timeout", float),
    ("--cancel-grace", "cancel_grace", float),
    ("--window-events", "window_events", int),
    ("--window-bytes", "window_bytes", int),
]


class RunnerNameTaken(RunledgerError):
    """``runner add`` was given a name that is already used."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``runner`` (with its ``add`` action) to the ``runledger`` parser."""
    parser = subparsers.add_parser(
        "runner",
        help="run the runner daemon (or: runner add NAME, runner --status)",
        description="Run commands sent by a broker and stream their output to it.",
    )
    docs = {
        name: field.metadata.get("doc", "")
        for name, field in RunnerSettings.__dataclass_fields__.items()
    }
    for flag, name, kind in _FLAGS:
        help_text = docs[name]
        if name == "token":
            help_text += " Prefer RUNLEDGER_TOKEN: flags show in process lists."
        parser.add_argument(flag, dest=name, type=kind, help=help_text)
    parser.add_argument(
        "--status",
        action="store_true",
        help="print the figures of the spool of a runner that is not running",
    )
    parser.set_defaults(handler=run_runner)

    actions = parser.add_subparsers(dest="runner_action", metavar="ACTION")
    add = actions.add_parser(
        "add", help="create a runner in the database and print its token once"
    )
    add.add_argument("name", help="the runner's name, unique")
    add.set_defaults(handler=add_runner)


def settings_from(args: argparse.Namespace) -> RunnerSettings:
    """RunnerSettings from the flags, then RUNLEDGER_* variables, then defaults."""
    overrides = {name: getattr(args, name, None) for _, name, _ in _FLAGS}
    return load_settings(RunnerSettings, overrides)


def run_runner(args: argparse.Namespace) -> int:
    """``runledger runner``: run the daemon until SIGINT or SIGTERM."""
    settings = settings_from(args)
    if args.status:
        print(offline_report(settings.spool_path))
        return 0
    if not settings.token:
        raise ConfigurationError(
            "the runner needs its token: pass --token or set RUNLEDGER_TOKEN "
            "(create one with `runledger runner add NAME`)"
        )
    run_event_loop(serve(settings, sys.stdout if sys.stdout.isatty() else None))
    return 0


async def serve(settings: RunnerSettings, terminal: TextIO | None) -> None:
    """Run a Runner until a stop signal; draw the status line on ``terminal``."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop_requested.set)

    runner = Runner(settings)
    await runner.start()
    drawing = asyncio.create_task(_draw_status(runner, terminal)) if terminal else None
    try:
        await stop_requested.wait()
    finally:
        if drawing is not None:
            drawing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drawing
            assert terminal is not None
            terminal.write("\n")
        await runner.stop()


async def _draw_status(runner: Runner, terminal: TextIO) -> None:
    while True:
        # \r and "erase to end of line" redraw the line in place.
        terminal.write("\r\x1b[K" + status_line(runner.state()))
        terminal.flush()
        await asyncio.sleep(STATUS_LINE_SECONDS)


def add_runner(args: argparse.Namespace) -> int:
    """``runledger runner add NAME``: create the runner, print its token once."""
    url = database_url_from_env() or start_embedded_postgres()
    token = new_token()
    runner_id = asyncio.run(insert_runner(url, args.name, token))
    print(f"runner {args.name!r} added (id {runner_id})")
    print("its token, shown only now (keep it secret):")
    print(token)
    print("start it with: RUNLEDGER_TOKEN=<token> runledger runner --broker-url URL")
    return 0


async def insert_runner(url: str, name: str, token: str) -> Any:
    """Store a runner named ``name`` with the hash of ``token``; return its id.

    Raises RunnerNameTaken, or ConfigurationError if the schema is missing.
    """
    connection = await connect(url)
    try:
        return await connection.fetchval(queries.insert_runner, name, hash_token(token))
    except asyncpg.UniqueViolationError as error:
        raise RunnerNameTaken(f"a runner named {name!r} already exists") from error
    except asyncpg.UndefinedTableError as error:
        raise ConfigurationError(
            "the database has no runners table; run `runledger migrate` first"
        ) from error
    finally:
        await connection.close()
