"""Waking long polls: notifications per command, and a listener that comes back."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from core.commands import EVENTS_CHANNEL
from web.notifier import EventNotifier


async def test_notification_wakes_only_that_commands_waiters(database_url: str) -> None:
    """A NOTIFY for one command wakes its waiter; another command's keeps waiting."""
    notifier = EventNotifier(database_url)
    await notifier.start()
    try:
        woken = asyncio.create_task(notifier.wait("command-a", 10))
        untouched = asyncio.create_task(notifier.wait("command-b", 10))
        await asyncio.sleep(0.2)
        connection = await asyncpg.connect(database_url)
        try:
            await connection.execute(
                "SELECT pg_notify($1, 'command-a')", EVENTS_CHANNEL
            )
        finally:
            await connection.close()
        await asyncio.wait_for(woken, 5)
        assert not untouched.done()
    finally:
        await notifier.close()
    await asyncio.wait_for(untouched, 5)  # closing releases every waiter


async def test_lost_listener_is_restored(database_url: str) -> None:
    """When Postgres drops the LISTEN connection, it is re-established and used."""
    notifier = EventNotifier(database_url, check_interval=0.2)
    await notifier.start()
    admin = await asyncpg.connect(database_url)
    assert notifier._connection is not None
    first_pid = notifier._connection.get_server_pid()
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
        deadline = time.monotonic() + 20
        while True:
            await asyncio.sleep(0.2)
            if notifier.listening and notifier._connection is not None:
                pid = notifier._connection.get_server_pid()
                if pid != first_pid:
                    break
            assert time.monotonic() < deadline, "the listener did not come back"

        waiter = asyncio.create_task(notifier.wait("command-c", 10))
        await asyncio.sleep(0.2)
        await admin.execute("SELECT pg_notify($1, 'command-c')", EVENTS_CHANNEL)
        await asyncio.wait_for(waiter, 5)
    finally:
        await admin.close()
        await notifier.close()


def test_a_wake_before_the_wait_is_kept() -> None:
    """A notification between a subscriber's read and its wait is not lost."""
    notifier = EventNotifier("postgresql://unused@127.0.0.1/unused")
    with notifier.subscribe("command-d") as woken:
        notifier.wake("command-d")  # lands before the subscriber waits
        assert woken.is_set()
        woken.clear()
        notifier.wake("command-e")
        assert not woken.is_set()
    assert notifier._waiters == {}
