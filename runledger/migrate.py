"""``runledger migrate``: bring the schema to the newest revision."""

from __future__ import annotations

import argparse
import sys

from runledger.database import resolve_database_url


def _run(args: argparse.Namespace) -> int:
    # alembic and SQLAlchemy load only for the commands that migrate.
    from core import migrate as migrations

    url = resolve_database_url()
    migrations.upgrade(url, args.revision)
    print(f"runledger: schema is at revision {args.revision}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``runledger migrate``."""
    parser = subparsers.add_parser(
        "migrate",
        help="create or upgrade the schema (alembic upgrade)",
        description="Create or upgrade the schema. Same as `alembic upgrade "
        "head`, but also starts the embedded Postgres when no DATABASE_URL "
        "is set.",
    )
    parser.add_argument(
        "revision",
        nargs="?",
        default="head",
        help="alembic revision to upgrade to (default: %(default)s, the newest)",
    )
    parser.set_defaults(handler=_run)
