"""Group commit: one writer per broker process stores every session's events.

Sessions put checked frames on a bounded queue (a full queue stops them
reading their sockets, which is the backpressure). The writer takes as many
frames as are waiting, up to ``commit_max_events``, and stores them in one
transaction:

1. lock the runners' rows ``FOR SHARE`` and compare their connection epochs,
   so a write from a fenced connection can never commit after the fence;
2. check that every command exists and belongs to the sending runner;
3. insert with one set-based statement (``unnest`` arrays, ``ON CONFLICT DO
   NOTHING``), then compare the events that were not inserted with what is
   stored: the same event is acknowledged again, anything else is a conflict;
4. record refusals and ``pg_notify`` each command that grew.

Only after ``COMMIT`` does a frame's outcome resolve, and only then does its
session send the ``event-ack``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

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
    assigned_sequence: bool
    result: wire.Acknowledged | wire.Refused | None = None


@dataclass(frozen=True)
class _CommandState:
    runner_id: uuid.UUID
    highest_sequence: int


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
        while True:
            batch = await self._next_batch()
            try:
                await self._commit_with_retries(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()
                metrics.INGEST_QUEUE_FRAMES.set(self._queue.qsize())

    async def _next_batch(self) -> list[Submission]:
        """Every waiting frame up to the event limit, waiting briefly if few."""
        first = await self._queue.get()
        batch = [first]
        events = len(first.events)
        deadline = time.perf_counter() + self._settings.commit_window_seconds

        while events < self._settings.commit_max_events:
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
            batch.append(submission)
            events += len(submission.events)
        return batch

    async def _commit_with_retries(self, batch: list[Submission]) -> None:
        """Commit ``batch``; retry transient failures, isolate the others."""
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
            # A copy, so a retried transaction numbers legacy events afresh.
            _Placed(submission, replace(event), event.sequence is None)
            for submission in batch
            for event in submission.events
        ]

        async with self._pool.acquire() as connection, connection.transaction():
            fenced_runners = await self._fenced_runners(connection, batch)
            commands = await self._command_states(connection, placed)
            candidates = _authorise_and_choose(placed, fenced_runners, commands)
            inserted = await self._insert(connection, candidates)
            await self._compare_leftovers(connection, placed, inserted)
            await self._record_refusals(connection, batch, placed)
            grown = sorted({key[0] for key in inserted})
            if grown:
                await connection.execute(queries.notify_events, EVENTS_CHANNEL, grown)

        # Committed: from here on the outcomes may be told to the runners.
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.COMMIT_BATCH_EVENTS.observe(len(placed))
        metrics.EVENTS_STORED.inc(len(inserted))
        self._report_sequences(placed, inserted, commands)
        _resolve(batch, placed, fenced_runners)
        log.debug(
            "broker.batch_committed",
            frames=len(batch),
            events=len(placed),
            stored=len(inserted),
            seconds=round(time.perf_counter() - started, 6),
        )

    async def _fenced_runners(
        self, connection: asyncpg.Connection, batch: list[Submission]
    ) -> set[tuple[uuid.UUID, int]]:
        """(runner, epoch) pairs of this batch that a newer connection fenced."""
        runner_ids = sorted({submission.runner_id for submission in batch})
        rows = await connection.fetch(queries.lock_runner_epochs, runner_ids)
        current = {row["id"]: row["connection_epoch"] for row in rows}
        return {
            (submission.runner_id, submission.connection_epoch)
            for submission in batch
            if current.get(submission.runner_id) != submission.connection_epoch
        }

    async def _command_states(
        self, connection: asyncpg.Connection, placed: list[_Placed]
    ) -> dict[uuid.UUID, _CommandState]:
        command_ids = list({item.event.command_id for item in placed})
        if not command_ids:
            return {}
        rows = await connection.fetch(queries.command_owners, command_ids)
        return {
            row["id"]: _CommandState(row["runner_id"], row["highest_sequence"] or 0)
            for row in rows
        }

    async def _insert(
        self, connection: asyncpg.Connection, candidates: list[_Placed]
    ) -> set[tuple[uuid.UUID, int]]:
        if not candidates:
            return set()
        events = [item.event for item in candidates]
        rows = await connection.fetch(
            queries.insert_events,
            [event.command_id for event in events],
            [event.sequence for event in events],
            [event.id for event in events],
            [event.kind for event in events],
            [event.stream for event in events],
            [event.data for event in events],
            [event.payload_json for event in events],
            [event.emitted_at for event in events],
        )
        inserted = {(row["command_id"], row["sequence"]) for row in rows}
        for item in candidates:
            key = (item.event.command_id, item.event.sequence)
            if key in inserted:
                item.result = _acknowledged(item.event)
        return inserted

    async def _compare_leftovers(
        self,
        connection: asyncpg.Connection,
        placed: list[_Placed],
        inserted: set[tuple[uuid.UUID, int]],
    ) -> None:
        """Acknowledge resent events again; refuse the ones that conflict."""
        leftovers = [
            (position, item)
            for position, item in enumerate(placed)
            if item.result is None
        ]
        if not leftovers:
            return
        events = [item.event for _, item in leftovers]
        rows = await connection.fetch(
            queries.compare_with_stored,
            [position for position, _ in leftovers],
            [event.command_id for event in events],
            [event.sequence for event in events],
            [event.id for event in events],
            [event.kind for event in events],
            [event.stream for event in events],
            [event.data for event in events],
            [event.payload_json for event in events],
        )

        for row in rows:
            item = placed[row["position"]]
            event = item.event
            if row["same_at_key"]:
                item.result = _acknowledged(event)
                metrics.EVENTS_DUPLICATE.inc()
            elif item.assigned_sequence and row["same_by_id"]:
                # A legacy resend: the broker numbered it the first time.
                event.sequence = row["sequence_of_id"]
                item.result = _acknowledged(event)
                metrics.EVENTS_DUPLICATE.inc()
            else:
                item.result = _conflict(event, row["id_at_key"], row["sequence_of_id"])
                metrics.EVENTS_CONFLICT.inc()
                log.warning(
                    "broker.event_conflict",
                    runner_id=str(item.submission.runner_id),
                    command_id=str(event.command_id),
                    sequence=event.sequence,
                    event_id=str(event.id),
                    reason=item.result.reason,
                )

    async def _record_refusals(
        self,
        connection: asyncpg.Connection,
        batch: list[Submission],
        placed: list[_Placed],
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

    def _report_sequences(
        self,
        placed: list[_Placed],
        inserted: set[tuple[uuid.UUID, int]],
        commands: dict[uuid.UUID, _CommandState],
    ) -> None:
        arrivals: dict[uuid.UUID, list[int]] = defaultdict(list)
        for item in placed:
            key = (item.event.command_id, item.event.sequence)
            if item.event.sequence is not None and key in inserted:
                arrivals[item.event.command_id].append(item.event.sequence)

        for command_id, sequences in arrivals.items():
            anomalies = sequence_anomalies(
                commands[command_id].highest_sequence, sequences
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


def _authorise_and_choose(
    placed: list[_Placed],
    fenced_runners: set[tuple[uuid.UUID, int]],
    commands: dict[uuid.UUID, _CommandState],
) -> list[_Placed]:
    """Refuse what may not be written; number legacy events; pick one per key.

    The first event of a batch with a given key (or id) is the one inserted;
    later ones with the same key are compared with it after the insert.
    """
    next_sequence = {
        command_id: state.highest_sequence for command_id, state in commands.items()
    }
    for item in placed:
        if item.event.sequence is not None and item.event.command_id in next_sequence:
            command_id = item.event.command_id
            next_sequence[command_id] = max(
                next_sequence[command_id], item.event.sequence
            )

    candidates: list[_Placed] = []
    seen_keys: set[tuple[uuid.UUID, int]] = set()
    seen_ids: set[tuple[uuid.UUID, uuid.UUID]] = set()
    for item in placed:
        event = item.event
        submission = item.submission
        state = commands.get(event.command_id)
        if (submission.runner_id, submission.connection_epoch) in fenced_runners:
            item.result = _refused(
                event,
                "fenced",
                "a newer connection of this runner took over; "
                "the events go through that connection",
            )
            continue
        if state is None:
            item.result = _refused(
                event, "unknown_command", f"command {event.command_id} does not exist"
            )
            continue
        if state.runner_id != submission.runner_id:
            item.result = _refused(
                event,
                "not_assigned",
                f"command {event.command_id} is not assigned to this runner",
            )
            continue

        # Older runners leave numbering to the broker.
        if event.id is None:
            event.id = uuid.uuid4()
        if event.sequence is None:
            next_sequence[event.command_id] += 1
            event.sequence = next_sequence[event.command_id]

        key = (event.command_id, event.sequence)
        identity = (event.command_id, event.id)
        if key in seen_keys or identity in seen_ids:
            continue
        seen_keys.add(key)
        seen_ids.add(identity)
        candidates.append(item)
    return candidates


def _resolve(
    batch: Sequence[Submission],
    placed: list[_Placed],
    fenced_runners: set[tuple[uuid.UUID, int]],
) -> None:
    outcomes = {
        id(submission): Outcome(
            refused=list(submission.refused),
            fenced=(submission.runner_id, submission.connection_epoch)
            in fenced_runners,
        )
        for submission in batch
    }
    for item in placed:
        outcome = outcomes[id(item.submission)]
        if isinstance(item.result, wire.Acknowledged):
            outcome.acknowledged.append(item.result)
        elif isinstance(item.result, wire.Refused) and item.result.code != "fenced":
            # Fenced events are not refused for good: the newer connection
            # delivers them, so the session closes instead of refusing.
            outcome.refused.append(item.result)

    for submission in batch:
        outcome = outcomes[id(submission)]
        for refused in outcome.refused:
            metrics.EVENTS_REFUSED.labels(refused.code).inc()
        if not submission.outcome.done():
            submission.outcome.set_result(outcome)


def _acknowledged(event: PendingEvent) -> wire.Acknowledged:
    assert event.id is not None and event.sequence is not None
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
    elif sequence_of_id is not None:
        reason = (
            f"event id {event.id} is already stored as sequence {sequence_of_id} "
            f"of command {event.command_id}"
        )
    else:
        reason = "another event with this key or id came earlier in the same batch"
    return _refused(event, "conflict", reason)
