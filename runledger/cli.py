"""The ``runledger`` command: one entry point for every part.

Each service package contributes its own subcommands through a ``register``
function; this module only composes them, configures logging and turns
errors into a readable line and an exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from broker import cli as broker_cli
from broker import relay_cli
from core.errors import RunledgerError
from core.logging import configure_logging
from runledger import audit, dev, log, migrate
from runner import cli as runner_cli
from web import cli as web_cli

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every part's subcommands."""
    parser = argparse.ArgumentParser(
        prog="runledger",
        description="Carry build runners' output to the web through Postgres, "
        "without losing a byte.",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="DEBUG, INFO (default), WARNING or ERROR; or set RUNLEDGER_LOG_LEVEL",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="log JSON even on a terminal (the default when not on a terminal)",
    )
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True)

    for part in (
        dev,
        runner_cli,
        broker_cli,
        relay_cli,
        web_cli,
        log,
        audit,
        migrate,
    ):
        part.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one subcommand and exit with its code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json=args.log_json)

    try:
        code = args.handler(args)
    except RunledgerError as error:
        print(f"runledger: error: {error}", file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        print("runledger: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
