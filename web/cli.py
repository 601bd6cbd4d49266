"""``runledger web``: serve the pages, the API and the relay's ingest endpoint."""

from __future__ import annotations

import argparse
import asyncio
import signal

from core.database import database_url_from_env
from core.errors import RunledgerError
from core.logging import configure_logging, get_logger
from core.loop import run_event_loop
from core.settings import load_settings
from web.settings import WebSettings

log = get_logger("web")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``web`` subcommand."""
    parser = subparsers.add_parser(
        "web",
        help="serve the web tier (pages, read API, ingest)",
        description=(
            "Serve runledger's pages, JSON API and the relay's ingest endpoint. "
            "Needs RUNLEDGER_SIGNING_SECRET (shared with the relay); set "
            "RUNLEDGER_API_TOKEN to allow submitting and cancelling."
        ),
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.set_defaults(handler=run_web)


def run_web(args: argparse.Namespace) -> int:
    """Serve until interrupted; the exit code for the shell."""
    configure_logging()
    try:
        settings = load_settings(WebSettings, {"host": args.host, "port": args.port})
        database_url = database_url_from_env()
        if database_url is None:
            from core.embedded import start_embedded_postgres

            database_url = start_embedded_postgres()
        run_event_loop(_serve(settings, database_url))
    except RunledgerError as error:
        log.error("web.failed", error=str(error))
        print(f"runledger web: {error}")
        return 1
    return 0


async def _serve(settings: WebSettings, database_url: str) -> None:
    from web.server import WebServer

    server = WebServer(settings, database_url)
    await server.start()
    print(f"runledger web listening on {server.url}", flush=True)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopping.set)
    try:
        await stopping.wait()
    finally:
        await server.stop()
