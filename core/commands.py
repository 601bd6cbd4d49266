"""Submitting and cancelling commands: the writes that start a command's life.

The web tier, the command line and the tests all submit through here, so a
command always gets its relay state row and its runner is woken at once.

Notification channels (payloads stay tiny):

- ``runledger_commands``: a runner id; a command for it was submitted or
  cancelled. Brokers listen and push work to the runner if it is connected.
- ``runledger_events``: a command id; events of it were committed. The relay
  and the web tier's long polls listen.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import asyncpg

from core.database import Queries
from core.errors import RunledgerError

COMMANDS_CHANNEL = "runledger_commands"
EVENTS_CHANNEL = "runledger_events"

queries = Queries(Path(__file__).parent / "sql" / "commands.sql")


class UnknownRunnerError(RunledgerError):
    """A command named a runner that does not exist or is revoked."""


async def submit_command(
    connection: asyncpg.Connection,
    runner_id: uuid.UUID,
    argv: Sequence[str],
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
) -> uuid.UUID:
    """Store a queued command and wake its runner's broker; return the id.

    Raises ValueError for an empty argv.
    """
    if not argv:
        raise ValueError("argv must name a program to run")

    async with connection.transaction():
        command_id: uuid.UUID = await connection.fetchval(
            queries.insert_command,
            runner_id,
            json.dumps(list(argv)),
            cwd,
            json.dumps(dict(env or {})),
        )
        await connection.execute(queries.insert_delivery_state, command_id)
        # Delivered on commit, so the broker never sees an uncommitted command.
        await connection.execute(
            "SELECT pg_notify($1, $2)", COMMANDS_CHANNEL, str(runner_id)
        )
    return command_id


async def request_cancel(connection: asyncpg.Connection, command_id: uuid.UUID) -> bool:
    """Ask for a command to be cancelled; False if it already finished or is unknown."""
    async with connection.transaction():
        runner_id = await connection.fetchval(queries.request_cancel, command_id)
        if runner_id is None:
            return False
        await connection.execute(
            "SELECT pg_notify($1, $2)", COMMANDS_CHANNEL, str(runner_id)
        )
    return True


async def runner_id_by_name(connection: asyncpg.Connection, name: str) -> uuid.UUID:
    """The id of the runner called ``name``; raises UnknownRunnerError."""
    runner_id: uuid.UUID | None = await connection.fetchval(
        queries.find_runner_by_name, name
    )
    if runner_id is None:
        raise UnknownRunnerError(
            f"no runner named {name!r}; add one with `runledger runner add {name}`"
        )
    return runner_id
