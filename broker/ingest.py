"""Group commit: one writer per broker process stores every session's events.

Sessions put checked frames on a bounded queue (a full queue stops them
reading their sockets, which is the backpressure). The writer takes as many
frames as are waiting, up to ``commit_max_events``, and stores them with one
statement, which is its own transaction (one round trip to Postgres). It
keeps up to ``commits_in_flight`` such transactions running, never two
with events of the same command, so each command's events commit in order.
What the broker holds is bounded: the transactions in flight, the frames
held back behind them and the queue (each at most ``ingest_queue_frames``),
and one frame per connection waiting for room. Each transaction:

- the runners' rows are locked ``FOR SHARE`` and their connection epochs
  compared, so a write from a fenced connection never commits after the
  fence, whichever broker raised it;
- only events of commands assigned to the sending runner are inserted, with
  ``unnest`` arrays and ``ON CONFLICT DO NOTHING``;
- each command that grew gets a ``pg_notify`` on ``runledger_events``, sent
  at commit.

The events that were not inserted are then compared with what is stored
(stored events never change): the same event is acknowledged again; a
different one at its key or id is a conflict; the rest were not the
runner's to write. Only after the commit does a frame's outcome resolve, and
only then does its session send the ``event-ack``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from broker import metrics
from broker.frames import PendingEvent
from broker.settings import BrokerSettings
from core import wire
from core.commands import EVENTS_CHANNEL
from core.database import Queries
from core.errors import DatabaseError
from core.logging import get_logger

log = get_logger("broker")
queries = Queries(Path(__file__).parent / "sql" / "ingest.sql")

# Errors after which the same transaction may well succeed on a new attempt.
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.LockNotAvailableError,
    asyncpg.QueryCanceledError,
    asyncpg.AdminShutdownError,
    asyncpg.TooManyConnectionsError,
    TimeoutError,
)
_RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# The writer's wait for the next frame, a task that lives as long as the broker.
WAITING_TASK_NAME = "broker-writer-wait"


@dataclass
class Outcome:
    """What became of one frame's events once its transaction ended."""

    acknowledged: list[wire.Acknowledged] = field(default_factory=list)
    refused: list[wire.Refused] = field(default_factory=list)
    fenced: bool = False


@dataclass
class Submission:
    """One frame's checked events, waiting for the writer."""

    runner_id: uuid.UUID
    connection_epoch: int
    events: list[PendingEvent]
    refused: list[wire.Refused] = field(default_factory=list)
    received_at: float = field(default_factory=time.perf_counter)
    outcome: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(frozen=True)
class SequenceAnomalies:
    """Gaps (first, last missing) and late sequences seen in one command."""

    gaps: list[tuple[int, int]]
    out_of_order: list[int]


def sequence_anomalies(
    highest_stored: int, arrivals: Iterable[int]
) -> SequenceAnomalies:
    """Gaps and out-of-order arrivals, given the highest sequence stored before.

    ``arrivals`` are the newly stored sequences of one command in the order
    they arrived. An arrival above ``highest + 1`` opens a gap; an arrival
    below the highest seen so far came out of order (it may fill a gap).
    """
    gaps: list[tuple[int, int]] = []
    out_of_order: list[int] = []
    highest = highest_stored
    for sequence in arrivals:
        if sequence > highest + 1:
            gaps.append((highest + 1, sequence - 1))
        elif sequence < highest:
            out_of_order.append(sequence)
        highest = max(highest, sequence)
    return SequenceAnomalies(gaps, out_of_order)


@dataclass
class _Placed:
    """An event of a batch, where it came from and what became of it."""

    submission: Submission
    event: PendingEvent
    numbered_by_broker: bool
    result: wire.Acknowledged | wire.Refused | None = None


@dataclass
class _Stored:
    """What the storing statement reports back."""

    positions: list[int] = field(default_factory=list)
    highest_before: dict[uuid.UUID, int] = field(default_factory=dict)


class IngestWriter:
    """The one writer task of a broker process; see the module docstring."""

    def __init__(self, pool: asyncpg.Pool, settings: BrokerSettings) -> None:
        self._pool = pool
        self._settings = settings
        self._queue: asyncio.Queue[Submission] = asyncio.Queue(
            maxsize=settings.ingest_queue_frames
        )
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Start the writer task."""
        self._task = asyncio.create_task(self._run(), name="broker-writer")

    async def stop(self, grace_seconds: float) -> None:
        """Commit what is queued (within ``grace_seconds``), then stop the task."""
        self._stopping = True
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), grace_seconds)
        except TimeoutError:
            log.warning("broker.writer_stop_timeout", queued=self._queue.qsize())
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

        # Frames that never reached Postgres get no acknowledgement; the
        # runner resends them.
        while not self._queue.empty():
            submission = self._queue.get_nowait()
            if not submission.outcome.done():
                submission.outcome.set_exception(
                    DatabaseError("the broker stopped before storing these events")
                )
            self._queue.task_done()

    @property
    def alive(self) -> bool:
        """Whether the writer task runs."""
        return self._task is not None and not self._task.done()

    async def submit(self, submission: Submission) -> None:
        """Queue a frame; waits while the queue is full (the backpressure)."""
        await self._queue.put(submission)
        metrics.INGEST_QUEUE_FRAMES.set(self._queue.qsize())

    async def _run(self) -> None:
        """Form batches and commit them, up to ``commits_in_flight`` at once.

        A frame joins a batch only when no transaction in flight holds an
        event of its commands, so each command's events commit one
        transaction after another: the highest sequence read before a batch
        includes every earlier batch of that command, and legacy numbering
        cannot race. Frames held back keep their order.
        """
        in_flight: dict[asyncio.Task[None], set[uuid.UUID]] = {}
        held: deque[Submission] = deque()
        try:
            await self._schedule(in_flight, held)
        finally:
            for task in in_flight:
                task.cancel()

    async def _schedule(
        self,
        in_flight: dict[asyncio.Task[None], set[uuid.UUID]],
        held: deque[Submission],
    ) -> None:
        while True:
            if len(in_flight) >= self._settings.commits_in_flight:
                await self._finish_one(in_flight)
                continue

            busy = set().union(*in_flight.values())
            batch = self._take_ready(held, busy)
            if not batch:
                await self._wait_for_work(in_flight, held)
                continue
            await self._fill_batch(batch, held, busy)

            commands = {event.command_id for s in batch for event in s.events}
            task = asyncio.create_task(
                self._commit_and_settle(batch), name="broker-commit"
            )
            in_flight[task] = commands

    async def _finish_one(self, in_flight: dict[asyncio.Task[None], Any]) -> None:
        done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            del in_flight[task]
            task.result()

    @staticmethod
    def _take_ready(held: deque[Submission], busy: set[uuid.UUID]) -> list[Submission]:
        """Held frames whose commands no transaction in flight holds, in order."""
        ready: list[Submission] = []
        for _ in range(len(held)):
            submission = held.popleft()
            if _commands(submission) & busy:
                held.append(submission)
            else:
                ready.append(submission)
        return ready

    async def _wait_for_work(
        self, in_flight: dict[asyncio.Task[None], Any], held: deque[Submission]
    ) -> None:
        """Wait for a frame, or for a commit that frees held frames."""
        if len(held) >= self._settings.ingest_queue_frames or (
            held and self._queue.empty() and in_flight
        ):
            await self._finish_one(in_flight)
            return
        getting = asyncio.create_task(self._queue.get(), name=WAITING_TASK_NAME)
        waiting: set[asyncio.Future[Any]] = {getting, *in_flight}
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            getting.cancel()
            raise
        for task in [task for task in in_flight if task in done]:
            del in_flight[task]
            task.result()
        if getting.done():
            held.append(getting.result())
        else:
            getting.cancel()
            # A frame taken just as the wait was cancelled must not be lost.
            with contextlib.suppress(asyncio.CancelledError):
                held.append(await getting)

    async def _fill_batch(
        self, batch: list[Submission], held: deque[Submission], busy: set[uuid.UUID]
    ) -> None:
        """Add waiting frames up to the event limit, waiting briefly if few."""
        events = sum(len(submission.events) for submission in batch)
        deadline = time.perf_counter() + self._settings.commit_window_seconds
        while (
            events < self._settings.commit_max_events
            and len(held) < self._settings.ingest_queue_frames
        ):
            if self._queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._stopping:
                    break
                try:
                    submission = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                submission = self._queue.get_nowait()
            if _commands(submission) & busy:
                held.append(submission)
                continue
            batch.append(submission)
            events += len(submission.events)

    async def _commit_and_settle(self, batch: list[Submission]) -> None:
        try:
            await self._commit_with_retries(batch)
        except Exception:
            # A fault of the broker itself: say so, and keep the writer going.
            log.exception("broker.commit_crashed", frames=len(batch))
            for submission in batch:
                if not submission.outcome.done():
                    submission.outcome.set_exception(
                        DatabaseError("the broker could not store these events")
                    )
        finally:
            for _ in batch:
                self._queue.task_done()
            metrics.INGEST_QUEUE_FRAMES.set(self._queue.qsize())

    async def _commit_with_retries(self, batch: list[Submission]) -> None:
        """Commit ``batch``; retry transient failures, isolate the others.

        A retry after a failure whose commit is unknown is safe: events that
        did get stored come back as "the same event stored" and are
        acknowledged.
        """
        attempt = 0
        while True:
            try:
                await self._commit(batch)
                return
            except _TRANSIENT_ERRORS as error:
                metrics.COMMIT_FAILURES.inc()
                delay = _RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)]
                attempt += 1
                log.warning(
                    "broker.commit_retry",
                    error=str(error),
                    attempt=attempt,
                    frames=len(batch),
                    delay=delay,
                )
                await asyncio.sleep(delay)
            except (asyncpg.PostgresError, ValueError) as error:
                metrics.COMMIT_FAILURES.inc()
                if len(batch) > 1:
                    # One frame may hold what Postgres rejects; find it alone.
                    for submission in batch:
                        await self._commit_with_retries([submission])
                    return
                log.error("broker.commit_failed", error=str(error))
                batch[0].outcome.set_exception(
                    DatabaseError("the broker could not store these events")
                )
                return

    async def _commit(self, batch: list[Submission]) -> None:
        started = time.perf_counter()
        placed = [
            _Placed(submission, event, event.numbered_by_broker)
            for submission in batch
            for event in submission.events
        ]

        async with self._pool.acquire() as connection:
            if any(item.numbered_by_broker for item in placed):
                await _number_legacy_events(connection, placed)
            stored = await _store(connection, placed)

            # Committed: the outcomes below may be told to the runners.
            committed = time.perf_counter()
            for position in stored.positions:
                placed[position].result = _acknowledged(placed[position].event)
            await _classify_unstored(connection, placed)
            await _record_refusals(connection, batch, placed)

        metrics.COMMIT_SECONDS.observe(committed - started)
        metrics.COMMIT_BATCH_EVENTS.observe(len(placed))
        metrics.EVENTS_STORED.inc(len(stored.positions))
        _report_sequences(placed, stored)
        _resolve(batch, placed)
        log.debug(
            "broker.batch_committed",
            frames=len(batch),
            events=len(placed),
            stored=len(stored.positions),
            seconds=round(committed - started, 6),
        )


def _commands(submission: Submission) -> set[uuid.UUID]:
    return {event.command_id for event in submission.events}


async def _number_legacy_events(
    connection: asyncpg.Connection, placed: list[_Placed]
) -> None:
    """Give events sent without a sequence the next ones of their command.

    Only the runner's current connection can store them (the fence), so the
    highest stored sequence cannot move under us.
    """
    command_ids = list({item.event.command_id for item in placed})
    rows = await connection.fetch(queries.highest_sequences, command_ids)
    highest = {row["command_id"]: row["highest"] for row in rows}
    for item in placed:
        sequence = item.event.sequence
        if not item.numbered_by_broker and sequence is not None:
            command_id = item.event.command_id
            highest[command_id] = max(highest.get(command_id, 0), sequence)
    for item in placed:
        # Numbered afresh on every attempt: an earlier one may have failed.
        if item.numbered_by_broker:
            command_id = item.event.command_id
            highest[command_id] = highest.get(command_id, 0) + 1
            item.event.sequence = highest[command_id]


async def _store(connection: asyncpg.Connection, placed: list[_Placed]) -> _Stored:
    """Insert, fence and notify in one statement, its own transaction."""
    stored = _Stored()
    if not placed:
        return stored
    events = [item.event for item in placed]
    rows = await connection.fetch(
        queries.store_events,
        list(range(len(placed))),
        *_event_columns(events),
        [event.emitted_at for event in events],
        [item.submission.runner_id for item in placed],
        [item.submission.connection_epoch for item in placed],
        EVENTS_CHANNEL,
    )

    # A stored key is that of the first event of the batch with the key.
    first_with_key: dict[tuple[uuid.UUID, int | None], int] = {}
    for position, event in enumerate(events):
        first_with_key.setdefault((event.command_id, event.sequence), position)
    for row in rows:
        if row["row_kind"] == "stored":
            key = (row["command_id"], row["sequence"])
            stored.positions.append(first_with_key[key])
        elif row["row_kind"] == "highest_before":
            stored.highest_before[row["command_id"]] = row["sequence"] or 0
    stored.positions.sort()
    return stored


def _event_columns(events: list[PendingEvent]) -> list[list[Any]]:
    """The arrays both the insert and the comparison take, in their order."""
    return [
        [event.command_id for event in events],
        [event.sequence for event in events],
        [event.id for event in events],
        [event.kind for event in events],
        [event.stream for event in events],
        [event.data for event in events],
        [event.payload_json for event in events],
    ]


async def _classify_unstored(
    connection: asyncpg.Connection, placed: list[_Placed]
) -> None:
    """Say why each event that was not inserted was not, from what is stored.

    Stored events never change, so reading after the commit is as good as
    reading inside it. In order: the same event is stored (acknowledged
    again); the command is unknown or another runner's; a different event
    holds the key or id (a conflict); else the connection was fenced.
    """
    unstored = [
        (position, item) for position, item in enumerate(placed) if item.result is None
    ]
    if not unstored:
        return
    columns = _event_columns([item.event for _, item in unstored])
    rows = await connection.fetch(
        queries.classify_unstored,
        [position for position, _ in unstored],
        *columns,
        [item.submission.runner_id for _, item in unstored],
        [item.submission.connection_epoch for _, item in unstored],
    )

    for row in rows:
        item = placed[row["position"]]
        event = item.event
        runner_id = item.submission.runner_id
        if row["same_at_key"]:
            item.result = _acknowledged(event)
            metrics.EVENTS_DUPLICATE.inc()
        elif item.numbered_by_broker and row["same_by_id"]:
            # A legacy resend: the broker numbered it the first time.
            event.sequence = row["sequence_of_id"]
            item.result = _acknowledged(event)
            metrics.EVENTS_DUPLICATE.inc()
        elif row["command_runner_id"] is None:
            item.result = _refused(
                event, "unknown_command", f"command {event.command_id} does not exist"
            )
        elif row["command_runner_id"] != runner_id:
            item.result = _refused(
                event,
                "not_assigned",
                f"command {event.command_id} is not assigned to this runner",
            )
        elif row["id_at_key"] is not None or row["sequence_of_id"] is not None:
            item.result = _conflict(event, row["id_at_key"], row["sequence_of_id"])
            metrics.EVENTS_CONFLICT.inc()
            log.warning(
                "broker.event_conflict",
                runner_id=str(runner_id),
                command_id=str(event.command_id),
                sequence=event.sequence,
                event_id=str(event.id),
                reason=item.result.reason,
            )
        elif row["current"]:
            # Held back by another event of the batch that claimed its key or
            # id first; unanswered, it is resent and stored on its own.
            continue
        else:
            item.result = _refused(
                event,
                "fenced",
                "this connection is no longer the runner's current one (a newer "
                "connection took over, or the runner was revoked)",
            )


async def _record_refusals(
    connection: asyncpg.Connection, batch: list[Submission], placed: list[_Placed]
) -> None:
    refusals: list[tuple[uuid.UUID, wire.Refused]] = [
        (submission.runner_id, refused)
        for submission in batch
        for refused in submission.refused
    ]
    refusals += [
        (item.submission.runner_id, item.result)
        for item in placed
        if isinstance(item.result, wire.Refused)
    ]
    if not refusals:
        return
    await connection.execute(
        queries.insert_refused_events,
        [runner_id for runner_id, _ in refusals],
        [refused.command_id for _, refused in refusals],
        [refused.sequence for _, refused in refusals],
        [str(refused.id) if refused.id else None for _, refused in refusals],
        [refused.code for _, refused in refusals],
        [refused.reason for _, refused in refusals],
    )


def _report_sequences(placed: list[_Placed], stored: _Stored) -> None:
    """Count and log gaps and late arrivals among the newly stored events."""
    arrivals: dict[uuid.UUID, list[int]] = defaultdict(list)
    for position in stored.positions:
        event = placed[position].event
        if event.sequence is not None:
            arrivals[event.command_id].append(event.sequence)

    for command_id, sequences in arrivals.items():
        anomalies = sequence_anomalies(
            stored.highest_before.get(command_id, 0), sequences
        )
        for first_missing, last_missing in anomalies.gaps:
            metrics.SEQUENCE_GAPS.inc()
            log.warning(
                "broker.sequence_gap",
                command_id=str(command_id),
                first_missing=first_missing,
                last_missing=last_missing,
            )
        if anomalies.out_of_order:
            metrics.OUT_OF_ORDER.inc(len(anomalies.out_of_order))
            log.warning(
                "broker.out_of_order",
                command_id=str(command_id),
                first_sequence=min(anomalies.out_of_order),
                last_sequence=max(anomalies.out_of_order),
                count=len(anomalies.out_of_order),
            )


def _resolve(batch: Sequence[Submission], placed: list[_Placed]) -> None:
    outcomes = {
        id(submission): Outcome(refused=list(submission.refused))
        for submission in batch
    }
    for item in placed:
        outcome = outcomes[id(item.submission)]
        if isinstance(item.result, wire.Acknowledged):
            outcome.acknowledged.append(item.result)
        elif isinstance(item.result, wire.Refused) and item.result.code == "fenced":
            # Not refused for good: the newer connection delivers these, so
            # the session closes instead of refusing them.
            outcome.fenced = True
        elif isinstance(item.result, wire.Refused):
            outcome.refused.append(item.result)

    for submission in batch:
        outcome = outcomes[id(submission)]
        for refused in outcome.refused:
            metrics.EVENTS_REFUSED.labels(refused.code).inc()
        if not submission.outcome.done():
            submission.outcome.set_result(outcome)


def _acknowledged(event: PendingEvent) -> wire.Acknowledged:
    assert event.sequence is not None
    return wire.Acknowledged(event.id, event.command_id, event.sequence)


def _refused(event: PendingEvent, code: str, reason: str) -> wire.Refused:
    return wire.Refused(
        code=code,
        reason=reason,
        id=event.id,
        command_id=event.command_id,
        sequence=event.sequence,
    )


def _conflict(
    event: PendingEvent, id_at_key: uuid.UUID | None, sequence_of_id: int | None
) -> wire.Refused:
    if id_at_key is not None and id_at_key != event.id:
        reason = (
            f"sequence {event.sequence} of command {event.command_id} is already "
            f"stored with another event id ({id_at_key})"
        )
    elif id_at_key is not None:
        reason = (
            f"sequence {event.sequence} of command {event.command_id} is already "
            "stored with this id and different content"
        )
    else:
        reason = (
            f"event id {event.id} is already stored as sequence {sequence_of_id} "
            f"of command {event.command_id}"
        )
    return _refused(event, "conflict", reason)
