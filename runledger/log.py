"""``runledger log``: a command's stored output, byte for byte, from Postgres."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import asyncpg

from core.database import Queries, connect
from core.errors import RunledgerError
from runledger.database import resolve_database_url

queries = Queries(Path(__file__).parent / "sql" / "log.sql")

PAGE_SIZE = 1000


class UnknownCommandError(RunledgerError):
    """No command has the id that was asked for."""


async def stored_events(
    connection: asyncpg.Connection, command_id: uuid.UUID, after: int = 0
) -> AsyncIterator[asyncpg.Record]:
    """Every stored event of a command after ``after``, in sequence order.

    Stops at the first missing sequence, so a reader never skips one.
    """
    expected = after + 1
    while True:
        page = await connection.fetch(queries.events_page, command_id, after, PAGE_SIZE)
        for record in page:
            if record["sequence"] != expected:
                return
            yield record
            expected += 1
        if len(page) < PAGE_SIZE:
            return
        after = page[-1]["sequence"]


async def write_log(
    url: str, command_id: uuid.UUID, stream: str | None, out: BinaryIO
) -> tuple[int, bool]:
    """Write a command's output to ``out``; return (last sequence, finished)."""
    connection = await connect(url)
    try:
        if not await connection.fetchval(queries.command_exists, command_id):
            raise UnknownCommandError(f"no command with id {command_id}")

        last_sequence, finished = 0, False
        async for event in stored_events(connection, command_id):
            last_sequence = event["sequence"]
            if event["kind"] == "exit":
                finished = True
            if event["kind"] == "output" and stream in (None, event["stream"]):
                out.write(event["data"])
        out.flush()
        return last_sequence, finished
    finally:
        await connection.close()


def _run(args: argparse.Namespace) -> int:
    try:
        command_id = uuid.UUID(args.command_id)
    except ValueError:
        raise UnknownCommandError(
            f"{args.command_id!r} is not a command id (a UUID)"
        ) from None

    url = resolve_database_url(quiet=True)
    last_sequence, finished = asyncio.run(
        write_log(url, command_id, args.stream, sys.stdout.buffer)
    )
    if not finished:
        print(
            f"runledger: the log is stored through sequence {last_sequence} and "
            "the command has not finished (or a later sequence is missing)",
            file=sys.stderr,
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``runledger log``."""
    parser = subparsers.add_parser(
        "log",
        help="write a command's stored output to standard output, byte for byte",
        description="Write a command's stored output to standard output, "
        "byte for byte, in sequence order, straight from Postgres.",
    )
    parser.add_argument("command_id", metavar="COMMAND_ID")
    parser.add_argument(
        "--stream",
        choices=("stdout", "stderr"),
        help="only this stream (default: both, interleaved as they were stored)",
    )
    parser.set_defaults(handler=_run)
