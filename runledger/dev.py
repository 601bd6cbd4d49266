"""``runledger dev``: the whole stack for one person, in one process.

It finds Postgres (or starts the embedded one), migrates, starts the broker,
the relay, the web tier and one local runner, and prints the page's address.
Given a command after ``--``, it runs it through that runner, shows its
output live, then proves the trip: bytes and SHA-256 of each stream as the
child wrote them against what Postgres stored, and the delivery figures.

The stack itself lives in :mod:`runledger.stack`, imported only when this
command runs, so that other commands (the runner daemon above all) do not
load the web tier.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import signal
import sys
from typing import TYPE_CHECKING

from core.database import database_url_from_env
from core.embedded import stop_embedded_postgres
from core.loop import run_event_loop
from runledger.database import resolve_database_url

if TYPE_CHECKING:
    from runledger.stack import CommandOutcome


def _echo_to_terminal(stream: str, data: bytes) -> None:
    target = sys.stdout if stream == "stdout" else sys.stderr
    target.buffer.write(data)
    target.buffer.flush()


def _say(message: str) -> None:
    print(f"runledger: {message}", file=sys.stderr, flush=True)


def report_outcome(outcome: CommandOutcome) -> None:
    """Print the verification line and the delivery figures."""
    for check in outcome.streams:
        verdict = "match" if check.matches else "MISMATCH"
        _say(
            f"verify {check.stream}: child wrote {check.written_bytes} bytes "
            f"sha256 {check.written_sha256[:16]}, stored {check.stored_bytes} bytes "
            f"sha256 {check.stored_sha256[:16]}: {verdict}"
        )
    verdict = (
        "MATCH: every byte stored as written"
        if outcome.verified
        else "MISMATCH: stored output differs from what the child wrote"
    )
    _say(f"verification: {verdict}")
    _say(
        f"delivery: {outcome.events_stored} events stored, "
        f"{outcome.events_delivered} forwarded, {outcome.events_pending} pending"
    )
    ending = f"exit code {outcome.exit_code}" if outcome.exit_code is not None else ""
    reason = f" ({outcome.reason})" if outcome.reason else ""
    _say(
        f"command {outcome.command_id} {outcome.status} {ending}{reason} "
        f"in {outcome.seconds:.1f} s"
    )


async def _run_dev(args: argparse.Namespace, url: str) -> int:
    from runledger.stack import DevOptions, DevStack

    stack = DevStack(
        DevOptions(
            database_url=url,
            host=args.host,
            broker_port=args.broker_port,
            web_port=args.web_port,
            runner_name=args.runner_name,
        )
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopping.set)

    exit_code = 0
    try:
        await stack.start()
        _say("the stack is up:")
        _say(f"  pages      {stack.web_url}/  (sign in with the API token)")
        _say(f"  API token  {stack.api_token}  (valid for this session)")
        _say(f"  broker     {stack.broker_url}  (runner {args.runner_name!r})")

        if args.argv:
            _say(f"running {shlex.join(args.argv)} on runner {args.runner_name!r}")
            run = asyncio.create_task(
                stack.run_command(args.argv, cwd=os.getcwd(), echo=_echo_to_terminal)
            )
            interrupted = asyncio.create_task(stopping.wait())
            done, _ = await asyncio.wait(
                {run, interrupted}, return_when=asyncio.FIRST_COMPLETED
            )
            if run not in done:
                run.cancel()
                _say("interrupted before the command finished")
                return 130
            interrupted.cancel()
            outcome = run.result()
            # The child's last line may lack a newline; start ours on a fresh one.
            print(file=sys.stderr)
            _say(f"log page {stack.web_url}/commands/{outcome.command_id}")
            report_outcome(outcome)
            exit_code = outcome.exit_code if outcome.exit_code is not None else 1
            if not outcome.verified:
                exit_code = exit_code or 1
            if args.exit:
                return exit_code

        _say("running; press Ctrl-C to stop")
        await stopping.wait()
        return exit_code
    finally:
        _say("stopping")
        with contextlib.suppress(Exception):
            await stack.stop()
        _say("stopped")


def _run(args: argparse.Namespace) -> int:
    if args.argv and args.argv[0] == "--":
        args.argv = args.argv[1:]
    # alembic and SQLAlchemy load only for the commands that migrate.
    from core import migrate

    embedded = database_url_from_env() is None
    url = resolve_database_url()
    migrate.upgrade(url)
    try:
        return run_event_loop(_run_dev(args, url))
    finally:
        # dev started the embedded server, so dev stops it; its data stays.
        if embedded:
            stop_embedded_postgres()
            _say("embedded Postgres stopped (its data stays in .runledger/pgdata)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``runledger dev``."""
    parser = subparsers.add_parser(
        "dev",
        help="run the whole stack locally (and optionally one command through it)",
        description="Start Postgres (embedded when DATABASE_URL is unset), "
        "migrate, and run the broker, relay, web tier and one local runner. "
        "With `-- CMD ARGS...`, run CMD through the runner, show its output "
        "live, then verify every byte and report the delivery figures.",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the broker and web tier bind to (default: %(default)s)",
    )
    parser.add_argument(
        "--broker-port",
        type=int,
        default=8765,
        help="the broker's WebSocket port; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--web-port",
        type=int,
        default=8000,
        help="the web tier's port; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--runner-name",
        default="local",
        help="name of the local runner, created if missing (default: %(default)s)",
    )
    parser.add_argument(
        "--exit",
        action="store_true",
        help="stop everything after CMD and exit with its exit code",
    )
    parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    parser.set_defaults(handler=_run)
