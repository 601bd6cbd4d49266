"""The SQLite spool: numbering, budget, acknowledgement and refusal, restarts."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest

from core.errors import SpoolError
from runner.spool import ROW_OVERHEAD_BYTES, Spool


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool.open(tmp_path / "spool.sqlite3", bytes_limit=10_000)


def test_sequences_start_at_one_and_have_no_gaps(spool: Spool) -> None:
    """Each command is numbered 1, 2, 3 on its own."""
    first, second = uuid.uuid4(), uuid.uuid4()
    spool.accept_command(first)
    spool.accept_command(second)
    numbers = [
        spool.append(command, "output", stream="stdout", data=b"x").sequence
        for command in (first, second, first, first, second)
    ]
    assert numbers == [1, 1, 2, 3, 2]


def test_numbering_continues_after_reopening(tmp_path: Path) -> None:
    """The counter lives on disk, so a restarted runner continues the numbering."""
    path = tmp_path / "spool.sqlite3"
    command_id = uuid.uuid4()
    spool = Spool.open(path, bytes_limit=10_000)
    spool.accept_command(command_id)
    spool.append(command_id, "status", payload={"status": "running", "pid": 1})
    spool.append(command_id, "output", stream="stdout", data=b"a")
    spool.close()

    reopened = Spool.open(path, bytes_limit=10_000)
    event = reopened.append(command_id, "output", stream="stdout", data=b"b")
    assert event.sequence == 3
    assert reopened.spooled_count == 3
    assert [e.sequence for e in reopened.read_after(0, 10)] == [1, 2, 3]


def test_the_journal_is_write_ahead(spool: Spool) -> None:
    """The spool runs in WAL mode."""
    connection = sqlite3.connect(spool.path)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()


def test_acknowledged_events_leave_and_free_the_budget(spool: Spool) -> None:
    """Acknowledging deletes exactly the matching (id, command, sequence)."""
    command_id = uuid.uuid4()
    spool.accept_command(command_id)
    events = [
        spool.append(command_id, "output", stream="stderr", data=b"12345")
        for _ in range(3)
    ]
    assert spool.spooled_bytes == 3 * (5 + ROW_OVERHEAD_BYTES)

    wrong_id = (uuid.uuid4(), command_id, events[0].sequence)
    right = (events[1].id, command_id, events[1].sequence)
    assert spool.acknowledge([wrong_id, right, right]) == [events[1].row]
    assert [e.sequence for e in spool.read_after(0, 10)] == [1, 3]
    assert spool.spooled_count == 2
    assert spool.spooled_bytes == 2 * (5 + ROW_OVERHEAD_BYTES)
    assert spool.pending_for(command_id) == 2


def test_the_budget_refuses_room_but_never_to_an_empty_spool(tmp_path: Path) -> None:
    """Room runs out at the budget; an empty spool takes even an oversized event."""
    spool = Spool.open(tmp_path / "spool.sqlite3", bytes_limit=1000)
    command_id = uuid.uuid4()
    spool.accept_command(command_id)
    assert spool.has_room(5000)
    spool.append(command_id, "output", stream="stdout", data=b"x" * 600)
    assert spool.has_room(200)
    assert not spool.has_room(300)


def test_refused_events_move_aside_with_the_reason(spool: Spool) -> None:
    """A refusal moves the event to the refused table, found by id or sequence."""
    command_id = uuid.uuid4()
    spool.accept_command(command_id)
    first = spool.append(command_id, "output", stream="stdout", data=b"a")
    second = spool.append(command_id, "output", stream="stdout", data=b"b")

    assert spool.refuse(first.id, None, None, "too_large", "over 1 MiB") == first.row
    assert spool.refuse(None, command_id, 2, "invalid", "bad stream") == second.row
    assert spool.refuse(uuid.uuid4(), None, None, "invalid", "x") is None
    assert spool.spooled_count == 0
    refused = spool.refused_events()
    assert [(r.sequence, r.code, r.reason) for r in refused] == [
        (2, "invalid", "bad stream"),
        (1, "too_large", "over 1 MiB"),
    ]
    assert spool.figures().refused == 2


def test_unfinished_commands_are_those_without_an_exit(spool: Spool) -> None:
    """Spooling the exit event marks the command finished in the same step."""
    running, finished = uuid.uuid4(), uuid.uuid4()
    for command in (running, finished):
        spool.accept_command(command)
        spool.append(command, "output", stream="stdout", data=b"abc")
    spool.record_pid(running, 99)
    spool.append(finished, "exit", payload={"status": "succeeded"})

    unfinished = spool.unfinished_commands()
    assert [(c.command_id, c.pid, c.stdout_bytes) for c in unfinished] == [
        (running, 99, 3)
    ]
    assert spool.is_finished(finished) and not spool.is_finished(running)


def test_reading_is_bounded_by_bytes(spool: Spool) -> None:
    """read_after stops before max_bytes of data, but returns at least one event."""
    command_id = uuid.uuid4()
    spool.accept_command(command_id)
    for _ in range(5):
        spool.append(command_id, "output", stream="stdout", data=b"x" * 100)
    assert len(spool.read_after(0, 10, max_bytes=250)) == 2
    assert len(spool.read_after(0, 10, max_bytes=10)) == 1
    assert [e.sequence for e in spool.read_after(3, 10)] == [4, 5]


def test_events_for_an_unknown_command_are_an_error(spool: Spool) -> None:
    """Appending for a command never accepted raises SpoolError."""
    with pytest.raises(SpoolError, match="never accepted"):
        spool.append(uuid.uuid4(), "output", stream="stdout", data=b"x")


def test_a_spool_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    """A path that cannot hold a spool raises SpoolError naming it."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError, match="cannot open the spool"):
        Spool.open(blocker / "spool.sqlite3", bytes_limit=1000)
    with pytest.raises(SpoolError, match="no spool"):
        Spool.open_read_only(tmp_path / "missing.sqlite3")


def test_one_spool_serves_one_runner(tmp_path: Path) -> None:
    """A second open of a spool in use is refused; it is free again once closed."""
    path = tmp_path / "spool.sqlite3"
    first = Spool.open(path, bytes_limit=1000)
    assert Spool.in_use(path)
    with pytest.raises(SpoolError, match="another runner is using the spool"):
        Spool.open(path, bytes_limit=1000)
    first.close()
    assert not Spool.in_use(path)
    Spool.open(path, bytes_limit=1000).close()
