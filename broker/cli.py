"""``runledger broker``: run the ingest server (and, on request, the relay)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from broker.server import BrokerServer
from broker.settings import BrokerSettings
from core.database import database_url_from_env
from core.embedded import start_embedded_postgres
from core.settings import load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``broker`` subcommand."""
    parser = subparsers.add_parser(
        "broker",
        help="run the broker: runners' WebSocket server, ingest and dispatch",
        description="Accept runners' connections, store their events in Postgres "
        "and acknowledge them after commit, and send them their commands. "
        "Every flag can also be set as a RUNLEDGER_* variable "
        "(RUNLEDGER_PORT, RUNLEDGER_MAX_FRAME_BYTES, ...).",
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8765; 0: any)")
    parser.add_argument(
        "--tls-cert", type=Path, help="PEM certificate chain, to serve wss://"
    )
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--broker-id", help="name of this broker in the runners table (host:pid)"
    )
    parser.add_argument(
        "--max-frame-bytes", type=int, help="largest frame accepted (1 MiB)"
    )
    parser.add_argument(
        "--max-batch-events", type=int, help="most events in one frame (1000)"
    )
    parser.add_argument(
        "--max-event-bytes", type=int, help="largest event accepted (256 KiB)"
    )
    parser.add_argument(
        "--max-events-per-second",
        type=int,
        help="events per second one connection may send (20000)",
    )
    parser.add_argument(
        "--max-connections-per-runner",
        type=int,
        help="open connections of one runner on this broker (4)",
    )
    parser.add_argument(
        "--commit-max-events", type=int, help="most events per transaction (4000)"
    )
    parser.add_argument(
        "--commit-window-seconds",
        type=float,
        help="wait for more events when a batch is small (0.001)",
    )
    parser.add_argument(
        "--with-relay",
        dest="run_relay",
        action="store_true",
        default=None,
        help="also run the outbox relay in this process (its settings come from "
        "RUNLEDGER_* variables, RUNLEDGER_SIGNING_SECRET among them)",
    )
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
    asyncio.run(_serve(settings, database_url))
    return 0


async def _serve(settings: BrokerSettings, database_url: str) -> None:
    broker = BrokerServer(settings, database_url)
    await broker.start()
    print(f"runledger broker: listening on {broker.url}", file=sys.stderr)
    if settings.run_relay:
        print(
            "runledger broker: the outbox relay runs in this process", file=sys.stderr
        )
    print(
        f"runledger broker: metrics on http{'s' if settings.tls else ''}://"
        f"{settings.host}:{broker.port}/metrics",
        file=sys.stderr,
    )

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
