"""``runledger relay``: run the outbox relay alone, list dead commands, replay them.

- ``runledger relay [--workers N ...]`` runs the relay standalone with its own
  ``/metrics`` and ``/metrics.json`` endpoint, until interrupted.
- ``runledger relay dead`` lists commands parked dead, with their last error.
- ``runledger relay replay COMMAND_ID`` (or ``--all``) puts them back in line;
  the delivery that failed is resent as it was, under the same delivery id.

``python -m broker.relay_cli ...`` runs the same commands without the rest of
the ``runledger`` command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import asyncpg

from broker.relay import Relay, queries
from broker.relay_metrics import MetricsServer
from broker.relay_settings import RelaySettings
from core.commands import EVENTS_CHANNEL
from core.database import connect, database_url_from_env, redact_url
from core.embedded import start_embedded_postgres
from core.errors import DatabaseError, RunledgerError
from core.logging import configure_logging, get_logger
from core.loop import run_event_loop
from core.settings import env_name, load_settings

log = get_logger("relay")

# Secrets never come from flags: they would show in the process list.
_NOT_FLAGS = ("signing_secret",)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``relay`` with its ``dead`` and ``replay`` subcommands."""
    relay = subparsers.add_parser(
        "relay",
        help="forward stored events to the web tier (standalone relay)",
        description="Run the outbox relay on its own, with /metrics and "
        "/metrics.json. The signing secret comes from RUNLEDGER_SIGNING_SECRET.",
    )
    _add_setting_flags(relay)
    relay.set_defaults(handler=run_relay)

    actions = relay.add_subparsers(metavar="ACTION")
    dead = actions.add_parser("dead", help="list commands parked dead, with errors")
    dead.set_defaults(handler=list_dead)

    replay = actions.add_parser("replay", help="put dead commands back in line")
    target = replay.add_mutually_exclusive_group(required=True)
    target.add_argument("command_id", nargs="?", type=uuid.UUID, help="one command")
    target.add_argument("--all", action="store_true", help="every dead command")
    replay.set_defaults(handler=replay_dead)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(RelaySettings):
        if field.name in _NOT_FLAGS:
            continue
        flag = "--" + field.name.removeprefix("relay_").replace("_", "-")
        help_text = f"{field.metadata['doc']} (env {env_name(field.name)}, "
        help_text += f"default {field.default})"
        if field.type in ("bool", bool):
            parser.add_argument(
                flag, dest=field.name, action="store_true", default=None, help=help_text
            )
            continue
        kind: Any = {"int": int, "float": float}.get(str(field.type), str)
        metavar = field.name.removeprefix("relay_").upper()
        parser.add_argument(
            flag, dest=field.name, type=kind, metavar=metavar, help=help_text
        )


def _database_url() -> str:
    return database_url_from_env() or start_embedded_postgres()


def run_relay(args: argparse.Namespace) -> int:
    """Run the standalone relay until SIGINT or SIGTERM."""
    settings = load_settings(RelaySettings, vars(args))
    run_event_loop(_serve(settings, _database_url()))
    return 0


async def _serve(settings: RelaySettings, database_url: str) -> None:
    relay = Relay(settings, database_url)
    server = MetricsServer(
        settings.relay_metrics_host, settings.relay_metrics_port, relay.summary
    )
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopped.set)

    await relay.start()
    try:
        await server.start()
        print(
            f"relay: forwarding from {redact_url(database_url)} to "
            f"{settings.sink_url}; metrics at "
            f"http://{settings.relay_metrics_host}:{server.port}/metrics",
            flush=True,
        )
        await stopped.wait()
    finally:
        await server.stop()
        await relay.stop()


def list_dead(_args: argparse.Namespace) -> int:
    """Print every dead command with its attempts, last status and error."""
    rows = asyncio.run(_fetch_dead(_database_url()))
    if not rows:
        print("no dead commands")
        return 0
    for row in rows:
        failing_since = row["first_failure_at"]
        since = failing_since.isoformat(timespec="seconds") if failing_since else "-"
        print(
            f"{row['command_id']}  delivered through {row['delivered_through']}  "
            f"attempts {row['attempts']}  status {row['last_status'] or '-'}  "
            f"failing since {since}\n    {row['last_error'] or ''}"
        )
    return 0


async def _fetch_dead(database_url: str) -> list[Any]:
    connection = await connect(database_url)
    try:
        with _translated_database_errors():
            return list(await connection.fetch(queries.list_dead))
    finally:
        await connection.close()


@contextlib.contextmanager
def _translated_database_errors() -> Iterator[None]:
    try:
        yield
    except asyncpg.PostgresError as error:
        raise DatabaseError(
            f"the relay's tables could not be read ({error}); "
            "is the database migrated (`runledger migrate`)?"
        ) from error


def replay_dead(args: argparse.Namespace) -> int:
    """Put one or every dead command back in line; 1 if there was none to replay."""
    command_id = None if args.all else args.command_id
    replayed = asyncio.run(replay_commands(_database_url(), command_id))
    if not replayed and command_id is not None:
        print(f"command {command_id} is not dead; nothing to replay", file=sys.stderr)
        return 1
    print(f"replayed {len(replayed)} command(s)")
    return 0


async def replay_commands(
    database_url: str, command_id: uuid.UUID | None
) -> list[uuid.UUID]:
    """Reactivate dead commands (one, or all for None) and wake the relays."""
    connection = await connect(database_url)
    try:
        with _translated_database_errors():
            async with connection.transaction():
                rows = await connection.fetch(queries.replay_dead, command_id)
                replayed = [row["command_id"] for row in rows]
                # Relays wake at once instead of at their next scan.
                for replayed_id in replayed:
                    await connection.execute(
                        "SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(replayed_id)
                    )
    finally:
        await connection.close()
    log.info("relay.replayed", commands=len(replayed))
    return replayed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m broker.relay_cli``: the relay commands on their own."""
    parser = argparse.ArgumentParser(prog="relay")
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        return int(args.handler(args))
    except RunledgerError as error:
        print(f"relay: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
