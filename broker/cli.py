"""``runledger broker``: run the ingest server (and, on request, the relay)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys
import typing
from pathlib import Path

from broker.server import BrokerServer
from broker.settings import BrokerSettings
from core.database import database_url_from_env
from core.embedded import start_embedded_postgres
from core.loop import run_event_loop
from core.settings import env_name, load_settings

# Set through the environment only: a fault for tests is no flag for people.
_NOT_FLAGS = ("fault_crash_before_acknowledge",)
_FLAG_NAMES = {"run_relay": "--with-relay", "run_retention": "--with-retention"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``broker`` subcommand, one flag per setting."""
    parser = subparsers.add_parser(
        "broker",
        help="run the broker: runners' WebSocket server, ingest and dispatch",
        description="Accept runners' connections, store their events in Postgres "
        "and acknowledge them after commit, and send them their commands. "
        "Each flag can also be set as the RUNLEDGER_* variable it names; with "
        "--with-relay the relay reads its own RUNLEDGER_* variables, "
        "RUNLEDGER_SIGNING_SECRET among them.",
    )
    hints = typing.get_type_hints(BrokerSettings)
    for field in dataclasses.fields(BrokerSettings):
        if field.name in _NOT_FLAGS:
            continue
        flag = _FLAG_NAMES.get(field.name, "--" + field.name.replace("_", "-"))
        help_text = (
            f"{field.metadata['doc']} (env {env_name(field.name)}, "
            f"default {field.default})"
        )
        kind = hints[field.name]
        if kind is bool:
            parser.add_argument(
                flag, dest=field.name, action="store_true", default=None, help=help_text
            )
        else:
            converter = next(
                (
                    t
                    for t in (int, float, Path)
                    if t in typing.get_args(kind) or t is kind
                ),
                str,
            )
            parser.add_argument(flag, dest=field.name, type=converter, help=help_text)
    parser.set_defaults(handler=run_broker)


def run_broker(args: argparse.Namespace) -> int:
    """Run until interrupted; return the exit code."""
    settings = load_settings(BrokerSettings, vars(args))
    database_url = database_url_from_env()
    if database_url is None:
        print(
            "runledger broker: no DATABASE_URL set; using the embedded Postgres",
            file=sys.stderr,
        )
        database_url = start_embedded_postgres()
    run_event_loop(_serve(settings, database_url))
    return 0


async def _serve(settings: BrokerSettings, database_url: str) -> None:
    broker = BrokerServer(settings, database_url)
    await broker.start()
    print(f"runledger broker: listening on {broker.url}", file=sys.stderr)
    scheme = "https" if settings.tls else "http"
    print(
        f"runledger broker: metrics on {scheme}://{settings.host}:{broker.port}/metrics",
        file=sys.stderr,
    )
    if settings.run_relay:
        print(
            "runledger broker: the outbox relay runs in this process", file=sys.stderr
        )
    if settings.run_retention:
        print("runledger broker: retention runs in this process", file=sys.stderr)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal_number, stopping.set)
    try:
        await stopping.wait()
    finally:
        print("runledger broker: stopping", file=sys.stderr)
        await broker.stop()
