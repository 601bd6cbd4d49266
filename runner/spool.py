"""The runner's spool: every event on disk from creation until acknowledged.

One SQLite file in WAL mode holds three tables:

- ``commands``: each command the runner accepted, its next sequence number
  (so a restarted runner continues the numbering), its child's pid, whether
  it has finished, and the bytes read so far from each stream;
- ``events``: events not yet acknowledged, in the order they were made
  (``row``), which is also the order they are sent;
- ``refused``: events the broker refused for good, with its code and reason,
  moved out of the way so later events go on.

The spool keeps a running total of the bytes it holds; callers check
:meth:`Spool.has_room` against the disk budget before adding output, which is
how a full spool turns into backpressure on the child rather than loss.

Everything here is synchronous and quick (one small transaction per call);
the daemon calls it from its event loop.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from core.database import Queries
from core.errors import SpoolError

# Bytes counted per event on top of its data and payload: row, keys, indexes.
ROW_OVERHEAD_BYTES = 160

queries = Queries(Path(__file__).parent / "sql" / "spool.sql")


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    """One event as the spool holds it; ``row`` gives the sending order.

    Ids and the payload stay in their stored text form, since sending needs
    nothing else; the properties give them as objects.
    """

    row: int
    command_key: str
    sequence: int
    id_key: str
    kind: str
    stream: str | None
    data: bytes
    payload_json: str | None
    emitted_at: float
    size: int

    @property
    def command_id(self) -> uuid.UUID:
        return uuid.UUID(self.command_key)

    @property
    def id(self) -> uuid.UUID:
        return uuid.UUID(self.id_key)

    @property
    def payload(self) -> dict[str, Any] | None:
        return None if self.payload_json is None else json.loads(self.payload_json)


@dataclass(frozen=True)
class UnfinishedCommand:
    """A command whose exit event was never spooled (its runner died)."""

    command_id: uuid.UUID
    pid: int | None
    stdout_bytes: int
    stderr_bytes: int


@dataclass(frozen=True)
class RefusedEvent:
    """An event moved aside because the broker refused it for good."""

    command_id: uuid.UUID
    sequence: int
    id: uuid.UUID
    kind: str
    code: str
    reason: str
    refused_at: float


@dataclass(frozen=True)
class SpoolFigures:
    """What the spool holds, for the status line and ``runner --status``."""

    spooled: int
    spooled_bytes: int
    refused: int
    unfinished_commands: int


def _event_from_row(row: Sequence[Any]) -> SpooledEvent:
    return SpooledEvent(*row)


class Spool:
    """An open spool file. Not thread-safe: use it from one thread (the loop)."""

    def __init__(
        self, connection: sqlite3.Connection, path: Path, bytes_limit: int
    ) -> None:
        self._connection = connection
        self._owner_lock: IO[bytes] | None = None
        self.path = path
        self.bytes_limit = bytes_limit
        self.spooled_bytes, self.spooled_count = self._connection.execute(
            queries.spool_totals
        ).fetchone()

    @classmethod
    def open(
        cls, path: Path, bytes_limit: int, *, synchronous: str = "NORMAL"
    ) -> Spool:
        """Open (creating if needed) the spool at ``path`` for this process alone.

        Two runners on one spool would send the same events; the second is
        refused. Raises SpoolError naming the path and what is wrong.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            owner_lock = _take_owner_lock(path)
        except OSError as error:
            raise SpoolError(f"cannot open the spool at {path}: {error}") from error
        try:
            connection = sqlite3.connect(path, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={synchronous.upper()}")
            connection.execute("PRAGMA busy_timeout=5000")
            connection.executescript(queries.create_schema)
        except (OSError, sqlite3.Error) as error:
            owner_lock.close()
            raise SpoolError(f"cannot open the spool at {path}: {error}") from error
        spool = cls(connection, path, bytes_limit)
        spool._owner_lock = owner_lock
        return spool

    @staticmethod
    def in_use(path: Path) -> bool:
        """Whether a running runner holds the spool at ``path``."""
        try:
            _take_owner_lock(path).close()
        except SpoolError:
            return True
        except OSError:
            return False
        return False

    @classmethod
    def open_read_only(cls, path: Path) -> Spool:
        """Open an existing spool only to read it (``runner --status``).

        Raises SpoolError when there is no spool at ``path``.
        """
        if not path.exists():
            raise SpoolError(f"there is no spool at {path}")
        try:
            connection = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None
            )
            spool = cls(connection, path, bytes_limit=0)
        except sqlite3.Error as error:
            raise SpoolError(f"cannot read the spool at {path}: {error}") from error
        return spool

    def close(self) -> None:
        """Close the file; everything written so far is already committed."""
        self._connection.close()
        if self._owner_lock is not None:
            self._owner_lock.close()
            self._owner_lock = None

    # Budget

    @staticmethod
    def size_of(data: bytes, payload: dict[str, Any] | None = None) -> int:
        """Bytes an event is counted for against the disk budget."""
        payload_size = 0 if payload is None else len(json.dumps(payload))
        return len(data) + payload_size + ROW_OVERHEAD_BYTES

    def has_room(self, size: int) -> bool:
        """Whether an event of ``size`` bytes fits the disk budget now.

        An empty spool always has room, so one event larger than the budget
        cannot block its command for ever.
        """
        return self.spooled_count == 0 or self.spooled_bytes + size <= self.bytes_limit

    # Commands

    def is_known(self, command_id: uuid.UUID) -> bool:
        """Whether this runner has accepted ``command_id`` before."""
        found = self._connection.execute(
            queries.find_command, (str(command_id),)
        ).fetchone()
        return found is not None

    def accept_command(self, command_id: uuid.UUID) -> None:
        """Record a new command; its first event will have sequence 1."""
        self._write(queries.accept_command, (str(command_id), time.time()))

    def record_pid(self, command_id: uuid.UUID, pid: int) -> None:
        """Remember the child's pid, for the record of a lost command."""
        self._write(queries.record_pid, (pid, str(command_id)))

    def unfinished_commands(self) -> list[UnfinishedCommand]:
        """Commands accepted whose exit event was never spooled."""
        rows = self._connection.execute(queries.unfinished_commands).fetchall()
        return [UnfinishedCommand(uuid.UUID(r[0]), r[1], r[2], r[3]) for r in rows]

    # Events

    def append(
        self,
        command_id: uuid.UUID,
        kind: str,
        *,
        stream: str | None = None,
        data: bytes = b"",
        payload: dict[str, Any] | None = None,
    ) -> SpooledEvent:
        """Give the command's next sequence to a new event and store it.

        An ``exit`` event also marks the command finished, in the same
        transaction, so a restart never reports a finished command as lost.
        Raises SpoolError if the command is unknown or the disk fails.
        """
        return self._append_events(command_id, [(kind, stream, data, payload)])[0]

    def append_output(
        self, command_id: uuid.UUID, stream: str, chunks: Sequence[bytes]
    ) -> list[SpooledEvent]:
        """Store consecutive output chunks of one stream in one transaction."""
        return self._append_events(
            command_id, [("output", stream, chunk, None) for chunk in chunks]
        )

    def _append_events(
        self,
        command_id: uuid.UUID,
        items: Sequence[tuple[str, str | None, bytes, dict[str, Any] | None]],
    ) -> list[SpooledEvent]:
        command_key = str(command_id)
        emitted_at = time.time()
        appended: list[SpooledEvent] = []
        stream_bytes = {"stdout": 0, "stderr": 0}

        try:
            with self._transaction() as cursor:
                found = cursor.execute(queries.next_sequence, (command_key,)).fetchone()
                if found is None:
                    raise SpoolError(f"command {command_id} was never accepted")
                sequence: int = found[0]
                for kind, stream, data, payload in items:
                    event_id = str(uuid.uuid4())
                    payload_text = None if payload is None else json.dumps(payload)
                    size = len(data) + len(payload_text or "") + ROW_OVERHEAD_BYTES
                    values = (
                        command_key,
                        sequence,
                        event_id,
                        kind,
                        stream,
                        data,
                        payload_text,
                        emitted_at,
                        size,
                    )
                    cursor.execute(queries.insert_event, values)
                    row = cursor.lastrowid
                    assert row is not None
                    appended.append(SpooledEvent(row, *values))
                    if stream in stream_bytes:
                        stream_bytes[stream] += len(data)
                    sequence += 1
                cursor.execute(
                    queries.advance_command,
                    (
                        len(items),
                        stream_bytes["stdout"],
                        stream_bytes["stderr"],
                        any(item[0] == "exit" for item in items),
                        command_key,
                    ),
                )
        except sqlite3.Error as error:
            raise self._write_failed(error) from error

        self.spooled_bytes += sum(event.size for event in appended)
        self.spooled_count += len(appended)
        return appended

    def read_after(
        self, row: int, limit: int, *, max_bytes: int | None = None
    ) -> list[SpooledEvent]:
        """Up to ``limit`` events made after ``row``, oldest first.

        With ``max_bytes``, stops before the data would exceed it (but always
        returns at least one event if any is there), so a large backlog is
        never loaded at once.
        """
        events: list[SpooledEvent] = []
        data_bytes = 0
        cursor = self._connection.execute(queries.events_after, (row, limit))
        for found in cursor:
            size = len(found[6])
            if events and max_bytes is not None and data_bytes + size > max_bytes:
                break
            events.append(_event_from_row(found))
            data_bytes += size
        cursor.close()
        return events

    def read_rows(self, rows: Iterable[int]) -> list[SpooledEvent]:
        """The events still spooled among ``rows``, oldest first."""
        found = self._connection.execute(
            queries.events_in_rows, (json.dumps(list(rows)),)
        ).fetchall()
        return [_event_from_row(r) for r in found]

    def pending_for(self, command_id: uuid.UUID) -> int:
        """Events of ``command_id`` still waiting for an acknowledgement."""
        count: int = self._connection.execute(
            queries.pending_for_command, (str(command_id),)
        ).fetchone()[0]
        return count

    def has_pending(self, command_id: uuid.UUID) -> bool:
        """Whether any event of ``command_id`` still waits (cheaper than a count)."""
        found = self._connection.execute(
            queries.any_pending_for_command, (str(command_id),)
        ).fetchone()
        return found is not None

    def is_finished(self, command_id: uuid.UUID) -> bool:
        """Whether the command's exit event has been spooled."""
        row = self._connection.execute(
            queries.find_command, (str(command_id),)
        ).fetchone()
        return bool(row and row[0])

    def acknowledge(
        self, acknowledged: Iterable[tuple[uuid.UUID, uuid.UUID, int]]
    ) -> list[int]:
        """Delete the (id, command_id, sequence) events; return their rows.

        Triples that match nothing (already deleted, or a different id under
        the same sequence) are ignored: acknowledging twice is harmless.
        """
        keys = json.dumps(
            [
                [str(command_id), sequence, str(event_id)]
                for event_id, command_id, sequence in acknowledged
            ]
        )
        try:
            with self._transaction() as cursor:
                removed = cursor.execute(
                    queries.delete_acknowledged, (keys,)
                ).fetchall()
        except sqlite3.Error as error:
            raise self._write_failed(error) from error
        self.spooled_bytes -= sum(size for _, size in removed)
        self.spooled_count -= len(removed)
        return [row for row, _ in removed]

    def refuse(
        self,
        event_id: uuid.UUID | None,
        command_id: uuid.UUID | None,
        sequence: int | None,
        code: str,
        reason: str,
    ) -> int | None:
        """Move one refused event aside with the broker's code and reason.

        The event is found by id, else by (command_id, sequence). Returns its
        row, or None when no spooled event matches.
        """
        lookup: tuple[str, tuple[Any, ...]]
        if event_id is not None:
            lookup = (queries.find_event_by_id, (str(event_id),))
        elif command_id is not None and sequence is not None:
            lookup = (queries.find_event_by_sequence, (str(command_id), sequence))
        else:
            return None

        with self._transaction() as cursor:
            found = cursor.execute(*lookup).fetchone()
            if found is None:
                return None
            cursor.execute(
                queries.move_to_refused, (code, reason, time.time(), found[0])
            )
            cursor.execute(queries.delete_row, (found[0],))
        self.spooled_bytes -= found[1]
        self.spooled_count -= 1
        row: int = found[0]
        return row

    def refused_events(self, limit: int = 100) -> list[RefusedEvent]:
        """The most recently refused events, newest first."""
        rows = self._connection.execute(queries.recent_refused, (limit,)).fetchall()
        return [
            RefusedEvent(uuid.UUID(r[0]), r[1], uuid.UUID(r[2]), r[3], r[4], r[5], r[6])
            for r in rows
        ]

    def figures(self) -> SpoolFigures:
        """Counts of what the spool holds right now."""
        refused = self._connection.execute(queries.count_refused).fetchone()
        unfinished = self._connection.execute(queries.count_unfinished).fetchone()
        return SpoolFigures(
            spooled=self.spooled_count,
            spooled_bytes=self.spooled_bytes,
            refused=refused[0],
            unfinished_commands=unfinished[0],
        )

    # Plumbing

    def _write(self, statement: str, parameters: Sequence[Any]) -> None:
        try:
            with self._transaction() as cursor:
                cursor.execute(statement, parameters)
        except sqlite3.Error as error:
            raise self._write_failed(error) from error

    def _write_failed(self, error: sqlite3.Error) -> SpoolError:
        return SpoolError(f"cannot write to the spool {self.path}: {error}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._connection)


def _take_owner_lock(path: Path) -> IO[bytes]:
    """An exclusive lock on ``<spool>.lock``, held while the file stays open.

    Raises SpoolError if another process holds it, OSError if it cannot be
    created.
    """
    lock_file = path.with_name(path.name + ".lock").open("ab")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise SpoolError(
            f"another runner is using the spool at {path}; stop it, or give "
            "this one its own spool with --spool"
        ) from None
    return lock_file


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back if the block raises."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> sqlite3.Cursor:
        self._cursor = self._connection.cursor()
        self._cursor.execute("BEGIN IMMEDIATE")
        return self._cursor

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if kind is None:
            self._cursor.execute("COMMIT")
        else:
            self._cursor.execute("ROLLBACK")
