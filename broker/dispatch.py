"""Sending commands and cancel requests to connected runners.

A dedicated connection LISTENs on ``runledger_commands`` (payload: a runner
id). A notification for a runner connected here wakes that session's
dispatch loop, which claims the runner's undispatched commands and sends
them, then sends ``cancel`` for its commands with a pending cancel request.
The same scan runs when a runner connects (the catch-up), and after a lost
listener is re-established, for every runner connected here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from broker import metrics
from core import wire
from core.commands import COMMANDS_CHANNEL
from core.database import Queries, connect
from core.errors import DatabaseError
from core.logging import get_logger

log = get_logger("broker")
queries = Queries(Path(__file__).parent / "sql" / "dispatch.sql")

LISTENER_RETRY_SECONDS = 1.0
LISTENER_CHECK_SECONDS = 10.0


class DispatchTarget(Protocol):
    """A runner's session as the dispatcher sees it."""

    runner_id: uuid.UUID
    connection_epoch: int
    cancels_sent: set[uuid.UUID]

    async def send_message(self, message: Any) -> None: ...


def _command_message(row: asyncpg.Record) -> wire.CommandMessage:
    env = row["env"]
    return wire.CommandMessage(
        command_id=row["id"],
        argv=list(json.loads(row["argv"])),
        cwd=row["cwd"],
        env=dict(json.loads(env)) if env else {},
    )


async def dispatch_pending(
    pool: asyncpg.Pool, target: DispatchTarget, *, catch_up: bool = False
) -> None:
    """Send ``target`` its queued commands and pending cancels.

    With ``catch_up`` (a fresh connection), commands sent on an earlier
    connection that never produced an event are sent again: the runner may
    never have received them. Raises asyncpg errors to the caller.
    """
    async with pool.acquire() as connection:
        resent: list[asyncpg.Record] = []
        if catch_up:
            resent = await connection.fetch(
                queries.dispatched_commands_without_events, target.runner_id
            )
        claimed = await connection.fetch(
            queries.claim_queued_commands, target.runner_id, target.connection_epoch
        )
        to_cancel = await connection.fetch(queries.commands_to_cancel, target.runner_id)

    resent_ids = {row["id"] for row in resent}
    for row in [*resent, *sorted(claimed, key=lambda row: row["created_at"])]:
        await target.send_message(_command_message(row))
        metrics.COMMANDS_DISPATCHED.inc()
        log.info(
            "broker.command_dispatched",
            runner_id=str(target.runner_id),
            command_id=str(row["id"]),
            resent=row["id"] in resent_ids,
        )

    for row in to_cancel:
        if row["id"] in target.cancels_sent:
            continue
        target.cancels_sent.add(row["id"])
        await target.send_message(wire.CancelMessage(command_id=row["id"]))
        metrics.CANCELS_SENT.inc()
        log.info(
            "broker.cancel_sent",
            runner_id=str(target.runner_id),
            command_id=str(row["id"]),
        )


class CommandListener:
    """LISTEN on ``runledger_commands`` and wake the runners it names.

    ``wake(runner_id)`` is called for each notification; ``wake_all()`` after
    the listener was (re)established, because notifications sent while it
    was down are lost.
    """

    def __init__(
        self,
        database_url: str,
        wake: Callable[[uuid.UUID], None],
        wake_all: Callable[[], None],
    ) -> None:
        self._database_url = database_url
        self._wake = wake
        self._wake_all = wake_all
        self._connection: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen; returns once the first LISTEN is in place."""
        await self._listen()
        self._task = asyncio.create_task(self._keep_listening(), name="broker-listen")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close()

    async def _listen(self) -> None:
        connection = await connect(self._database_url)
        connection.add_termination_listener(lambda _connection: self._lost.set())
        await connection.add_listener(COMMANDS_CHANNEL, self._on_notification)
        self._connection = connection
        self._lost.clear()

    async def _close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), 2.0)
            self._connection = None

    def _on_notification(
        self, _connection: Any, _pid: int, _channel: str, payload: str
    ) -> None:
        try:
            runner_id = uuid.UUID(payload)
        except ValueError:
            log.warning("broker.bad_notification", payload=payload[:100])
            return
        self._wake(runner_id)

    async def _keep_listening(self) -> None:
        """Re-establish a lost listener, then catch up on every runner."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), LISTENER_CHECK_SECONDS)
            if not self._lost.is_set() and await self._alive():
                continue

            log.warning("broker.listener_lost")
            await self._close()
            while True:
                try:
                    await self._listen()
                    break
                except DatabaseError as error:
                    log.warning("broker.listener_retry", error=str(error))
                    await asyncio.sleep(LISTENER_RETRY_SECONDS)
            log.info("broker.listener_restored")
            self._wake_all()

    async def _alive(self) -> bool:
        if self._connection is None or self._connection.is_closed():
            return False
        try:
            await asyncio.wait_for(self._connection.fetchval("SELECT 1"), 5.0)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            return False
        return True
