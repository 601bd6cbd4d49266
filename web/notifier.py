"""Waking long polls when events of a command are committed.

One dedicated connection LISTENs on ``runledger_events`` (payload: a command
id, sent by the broker in the transaction that stores the events). Waiters
for that command are woken; readers always re-read the database, so a
notification is a hint and a lost one costs only a poll interval. A lost
listening connection is re-established, and every waiter is woken then, so
nothing committed while it was away is waited past.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import asyncpg

from core.commands import EVENTS_CHANNEL
from core.database import connect
from core.errors import DatabaseError
from core.logging import get_logger

log = get_logger("web")

RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0)


class EventNotifier:
    """Per-command wake-ups fed by LISTEN, with reconnection."""

    def __init__(self, database_url: str, check_interval: float = 2.0) -> None:
        self._database_url = database_url
        self._check_interval = check_interval
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._connection: asyncpg.Connection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def listening(self) -> bool:
        """Whether the LISTEN connection is up."""
        return self._connection is not None and not self._connection.is_closed()

    async def start(self) -> None:
        """LISTEN now (raising DatabaseError if Postgres is unreachable)."""
        await self._listen()
        self._supervisor = asyncio.create_task(self._supervise())

    async def close(self) -> None:
        """Stop listening and release every waiter."""
        self._closed = True
        self.wake_all()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), timeout=2)
            self._connection = None

    @contextlib.contextmanager
    def subscribe(self, command_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``command_id`` may have new events.

        Subscribe before reading the database, and clear the event before
        each re-read: a notification that lands between a read and the wait
        is then never lost.
        """
        event = asyncio.Event()
        if self._closed:
            event.set()
        self._waiters.setdefault(command_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(command_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[command_id]

    async def wait(self, command_id: str, seconds: float) -> None:
        """Return when events of ``command_id`` may have been stored, or on timeout."""
        if self._closed or seconds <= 0:
            return
        with self.subscribe(command_id) as event, contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    def wake(self, command_id: str) -> None:
        """Wake the waiters of one command."""
        for event in self._waiters.get(command_id, ()):
            event.set()

    def wake_all(self) -> None:
        """Wake every waiter (listener lost, or shutting down)."""
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    @property
    def closed(self) -> bool:
        """Whether the notifier has been closed (the server is stopping)."""
        return self._closed

    def _on_notification(
        self, _connection: Any, _pid: int, _channel: str, payload: str
    ) -> None:
        self.wake(payload)

    async def _listen(self) -> None:
        connection = await connect(self._database_url)
        await connection.add_listener(EVENTS_CHANNEL, self._on_notification)
        self._connection = connection

    async def _supervise(self) -> None:
        # asyncpg does not reconnect by itself; check the connection and
        # replace it, waking everyone so nothing stored meanwhile is missed.
        attempt = 0
        while not self._closed:
            await asyncio.sleep(self._check_interval)
            if self.listening:
                attempt = 0
                continue
            try:
                await self._listen()
            except DatabaseError as error:
                delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                attempt += 1
                log.warning("web.listener_lost", error=str(error), retry_in=delay)
                await asyncio.sleep(delay)
                continue
            log.info("web.listener_restored")
            self.wake_all()
