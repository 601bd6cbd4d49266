"""The outbox relay: forwards stored events to an HTTP sink, in order, once.

Each of N workers loops: claim one command with a lease and read its next
events in sequence order (one statement, committed at once), POST them as one
signed batch, then record the outcome in a new transaction, while it already
claims its next command. No transaction is ever open across an HTTP request,
so a slow sink never holds Postgres back, and a worker that dies simply lets
its lease expire.

Work is found in two ways: a LISTEN on ``runledger_events`` over a dedicated
connection wakes one idle worker per notification (a worker that finds work
wakes the next), and a fallback scan wakes one every ``relay_scan_interval``.
The listening connection is pinged at the same pace; when it is lost the
relay listens again and wakes every worker to catch up.

State lives in ``command_delivery`` (cursor, lease, failures), ``deliveries``
(one row per successful request) and ``gaps`` (sequences skipped after a
hold). A batch's range is written down when it is claimed; until it is
delivered, every resend (after a failure, a timeout or a crash) carries
exactly those events under the same id (``command:first-last``), so the sink
can drop duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from broker import relay_metrics as metrics
from broker.backoff import THROTTLING_STATUSES, SinkPause, backoff_delay, retry_delay
from broker.relay_settings import RelaySettings
from broker.relay_sink import SinkClient
from core.commands import EVENTS_CHANNEL
from core.database import Queries, connect, create_pool
from core.delivery import DeliveredEvent, DeliveryBatch, delivery_id_for, encode
from core.errors import DatabaseError, DeliveryError
from core.logging import get_logger

__all__ = ["Relay", "RelaySettings"]

log = get_logger("relay")
queries = Queries(Path(__file__).parent / "sql" / "relay.sql")

# How long stop() lets workers finish the delivery they are in.
STOP_GRACE_SECONDS = 5.0
# A single-event run stops early enough to record before its lease runs out.
LEASE_SAFETY_SECONDS = 1.0


@dataclass(frozen=True)
class Claim:
    """A command a worker holds the lease on, as the claim found it."""

    command_id: uuid.UUID
    delivered_through: int
    attempts: int
    failing_seconds: float
    pending_first: int | None
    pending_last: int | None
    has_skipped_gaps: bool
    # The pending batch was chosen by this claim, not left by an earlier one.
    chosen_now: bool
    # The events after the cursor, read in the same round trip as the claim.
    next_events: list[asyncpg.Record] = field(default_factory=list)
    # When the lease was taken, on the monotonic clock.
    claimed_at: float = 0.0


@dataclass(frozen=True)
class Batch:
    """Consecutive events of one command to send; ``late`` if behind the cursor."""

    command_id: uuid.UUID
    events: list[DeliveredEvent]
    late: bool

    @property
    def first(self) -> int:
        return self.events[0].sequence

    @property
    def last(self) -> int:
        return self.events[-1].sequence


@dataclass
class Outcome:
    """What happened to a batch: how many leading events got through, and why not."""

    delivered: int
    status: int | None
    error: DeliveryError | None
    # Seconds before the failed part is tried again (set for retried failures).
    retry_in: float = 0.0


class Wakeup:
    """Wakes idle workers: one per signal, or all of them for a catch-up."""

    def __init__(self) -> None:
        self._sleepers: deque[asyncio.Future[None]] = deque()
        self._pending = False

    def wake_one(self) -> None:
        """Wake one sleeping worker, or the next one to go to sleep."""
        while self._sleepers:
            sleeper = self._sleepers.popleft()
            if not sleeper.done():
                sleeper.set_result(None)
                return
        self._pending = True

    def wake_all(self) -> None:
        """Wake every sleeping worker."""
        while self._sleepers:
            sleeper = self._sleepers.popleft()
            if not sleeper.done():
                sleeper.set_result(None)
        self._pending = True

    async def sleep(self) -> None:
        """Return when woken (at once if a wake-up came while nobody slept)."""
        if self._pending:
            self._pending = False
            return
        sleeper = asyncio.get_running_loop().create_future()
        self._sleepers.append(sleeper)
        try:
            await sleeper
        finally:
            if not sleeper.done():
                sleeper.cancel()


class Relay:
    """Forwards stored events to the sink with N workers; see the module text."""

    def __init__(self, settings: RelaySettings, database_url: str) -> None:
        settings.validate()
        self.settings = settings
        self.database_url = database_url
        self.relay_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.sink_pause = SinkPause()
        self._wakeup = Wakeup()
        self._pool: asyncpg.Pool | None = None
        self._sink: SinkClient | None = None
        self._listener: asyncpg.Connection | None = None
        self._listener_lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._workers: list[asyncio.Task[None]] = []
        self._recordings: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.busy_workers = 0
        self.queued_events = 0

    # Lifecycle

    async def start(self) -> None:
        """Connect, listen, start the workers; return once deliveries may flow."""
        settings = self.settings
        # Each worker claims on one connection while recording on another.
        self._pool = await create_pool(
            self.database_url, min_size=1, max_size=2 * settings.relay_workers + 1
        )
        assert settings.signing_secret is not None
        self._sink = SinkClient(
            settings.sink_url,
            settings.signing_secret,
            settings.relay_request_timeout,
            max_connections=settings.relay_workers,
        )
        await self._listen()

        self._tasks = [
            asyncio.create_task(self._watch_listener(), name="relay-listener"),
            asyncio.create_task(self._scan_periodically(), name="relay-scan"),
        ]
        self._workers = [
            asyncio.create_task(self._work(number), name=f"relay-worker-{number}")
            for number in range(settings.relay_workers)
        ]
        # Whatever was stored while no relay ran is due now.
        self._wakeup.wake_all()
        log.info(
            "relay.started",
            relay_id=self.relay_id,
            sink_url=settings.sink_url,
            workers=settings.relay_workers,
            single_event_mode=settings.relay_single_event_mode,
        )

    async def stop(self) -> None:
        """Let workers finish their delivery (bounded), give back leases, close."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        self._wakeup.wake_all()

        # Idle workers return at once; busy ones finish and record, or are cut.
        if self._workers:
            _, unfinished = await asyncio.wait(
                self._workers, timeout=STOP_GRACE_SECONDS
            )
            for task in unfinished:
                task.cancel()
        await asyncio.gather(*self._tasks, *self._workers, return_exceptions=True)
        self._tasks, self._workers = [], []
        # What the sink confirmed is written down before the pool closes.
        if self._recordings:
            await asyncio.wait(self._recordings, timeout=STOP_GRACE_SECONDS)

        if self._pool is not None:
            with contextlib.suppress(asyncpg.PostgresError, OSError):
                await self._pool.execute(queries.release_leases, self.relay_id + "/")
            await self._pool.close()
            self._pool = None
        await self._close_listener()
        if self._sink is not None:
            await self._sink.close()
            self._sink = None
        metrics.active_workers.set(0)
        metrics.processing.set(0)
        log.info("relay.stopped", relay_id=self.relay_id)

    def summary(self) -> dict[str, Any]:
        """Figures for dashboards, under the predecessor's names."""
        return {
            "forwardingQueue": {
                "queued": self.queued_events,
                "activeWorkers": self.busy_workers,
                "processing": self.busy_workers > 0,
            },
            "workers": self.settings.relay_workers,
            "sinkPausedSeconds": round(self.sink_pause.remaining(time.monotonic()), 3),
            "listening": self._listener is not None and not self._listener.is_closed(),
        }

    # Wake-ups

    async def _listen(self) -> None:
        self._listener_lost.clear()
        listener = await connect(self.database_url)
        listener.add_termination_listener(self._on_listener_terminated)
        await listener.add_listener(EVENTS_CHANNEL, self._on_notification)
        self._listener = listener

    def _on_notification(
        self, _connection: Any, _pid: int, _channel: str, _payload: str
    ) -> None:
        self._wakeup.wake_one()

    def _on_listener_terminated(self, _connection: Any) -> None:
        self._listener_lost.set()

    async def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and not listener.is_closed():
            listener.terminate()

    async def _watch_listener(self) -> None:
        """Ping the listening connection; when it is gone, listen again and catch up."""
        interval = self.settings.relay_scan_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._listener_lost.wait()
            if not self._listener_lost.is_set() and await self._listener_alive():
                continue

            log.warning("relay.listener_lost", relay_id=self.relay_id)
            await self._close_listener()
            failures = 0
            while True:
                try:
                    await self._listen()
                    break
                except (DatabaseError, asyncpg.PostgresError, OSError) as error:
                    failures += 1
                    delay = backoff_delay(failures, interval, 10 * interval)
                    log.warning("relay.listen_failed", error=str(error), retry_in=delay)
                    await asyncio.sleep(delay)
            log.info("relay.listening_again", relay_id=self.relay_id)

            # Notifications sent while we were deaf are lost: scan for them.
            self._wakeup.wake_all()

    async def _listener_alive(self) -> bool:
        listener = self._listener
        if listener is None or listener.is_closed():
            return False
        # Generous: a busy server is not a lost connection.
        try:
            async with asyncio.timeout(max(5.0, self.settings.relay_scan_interval)):
                await listener.fetchval("SELECT 1")
        except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            return False
        return True

    async def _scan_periodically(self) -> None:
        """The fallback: wake one worker and refresh the queue figure every interval."""
        assert self._pool is not None
        while True:
            await asyncio.sleep(self.settings.relay_scan_interval)
            self._wakeup.wake_one()
            try:
                queued = await self._pool.fetchval(queries.count_queued_events)
            except (asyncpg.PostgresError, OSError) as error:
                log.warning("relay.queue_count_failed", error=str(error))
                continue
            self.queued_events = int(queued)
            metrics.queued_events.set(self.queued_events)

    # Workers

    async def _work(self, number: int) -> None:
        # Each claim gets its own owner name, so an outcome recorded late can
        # never release a later lease on the same command.
        claims = itertools.count(1)
        failures = 0
        # The outcome of the previous delivery is written while the next claim
        # runs; the lease keeps everyone else off that command meanwhile.
        recording: asyncio.Task[None] | None = None
        while not self._stopping:
            # Nobody claims work for a sink that asked everyone to wait.
            paused = self.sink_pause.remaining(time.monotonic())
            if paused > 0:
                await asyncio.sleep(paused)
                continue

            try:
                owner = f"{self.relay_id}/{number}/{next(claims)}"
                claim = await self._claim(owner)
                if recording is not None:
                    await recording
                    recording = None
                if claim is None:
                    failures = 0
                    await self._wakeup.sleep()
                    continue
                # There may be more work than this: let another worker look.
                self._wakeup.wake_one()
                recording = await self._deliver_claim(owner, claim)
                failures = 0
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
                failures += 1
                delay = backoff_delay(failures, 0.1, self.settings.relay_backoff_cap)
                log.warning(
                    "relay.database_failed",
                    worker=number,
                    error=f"{type(error).__name__}: {error}",
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)
            except Exception:
                # A worker must outlive a bug in one delivery; its lease expires.
                failures += 1
                log.exception("relay.worker_failed", worker=number)
                await asyncio.sleep(
                    backoff_delay(failures, 1.0, self.settings.relay_backoff_cap)
                )

    async def _claim(self, owner: str) -> Claim | None:
        assert self._pool is not None
        settings = self.settings
        rows = await self._pool.fetch(
            queries.claim_command,
            owner,
            settings.relay_lease_duration,
            settings.relay_batch_max_events,
            settings.relay_batch_max_bytes,
        )
        if not rows:
            return None
        row = rows[0]
        return Claim(
            claimed_at=time.monotonic(),
            command_id=row["command_id"],
            delivered_through=row["delivered_through"],
            attempts=row["attempts"],
            failing_seconds=row["failing_seconds"] or 0.0,
            pending_first=row["pending_first_sequence"],
            pending_last=row["pending_last_sequence"],
            has_skipped_gaps=row["has_skipped_gaps"],
            chosen_now=row["chosen_now"],
            next_events=[row for row in rows if row["sequence"] is not None],
        )

    async def _deliver_claim(
        self, owner: str, claim: Claim
    ) -> asyncio.Task[None] | None:
        """Send the claimed command's next batch; return the task recording it."""
        assert self._pool is not None
        settings = self.settings
        claimed_at = claim.claimed_at
        self._set_busy(+1)
        recording: asyncio.Task[None] | None = None
        try:
            batch = await self._next_batch(owner, claim)
            if batch is None:
                return None

            # A pause that began after the claim still holds: no request before it.
            paused = self.sink_pause.remaining(time.monotonic())
            if paused > 0:
                await self._pool.execute(
                    queries.hold_command, claim.command_id, owner, paused
                )
                self._wake_after(paused)
                return None

            outcome = await self._send(batch, claimed_at)
            error = outcome.error
            if error is not None and not error.permanent:
                failures = 1 if outcome.delivered else claim.attempts + 1
                outcome.retry_in = retry_delay(
                    failures,
                    settings.relay_backoff_base,
                    settings.relay_backoff_cap,
                    error.retry_after,
                )
                # Every worker bound for this sink holds off, starting now.
                if error.status in THROTTLING_STATUSES:
                    self.sink_pause.pause(time.monotonic(), outcome.retry_in)

            recording = asyncio.create_task(
                self._record_and_release(owner, claim, batch, outcome)
            )
            self._recordings.add(recording)
            recording.add_done_callback(self._recordings.discard)
            return recording
        finally:
            if recording is None:
                self._set_busy(-1)

    def _wake_after(self, seconds: float) -> None:
        """Look for work when a held or retried command falls due, not a scan later."""
        asyncio.get_running_loop().call_later(seconds, self._wakeup.wake_one)

    def _set_busy(self, change: int) -> None:
        self.busy_workers += change
        metrics.active_workers.set(self.busy_workers)
        metrics.processing.set(1 if self.busy_workers else 0)

    async def _record_and_release(
        self, owner: str, claim: Claim, batch: Batch, outcome: Outcome
    ) -> None:
        """Record an outcome, trying again while the lease lasts.

        Recording is safe to repeat: every statement is conditioned on this
        claim's lease. If it never succeeds the lease expires and the batch is
        resent under the same delivery id, which the sink drops.
        """
        deadline = (
            claim.claimed_at + self.settings.relay_lease_duration - LEASE_SAFETY_SECONDS
        )
        failures = 0
        try:
            while True:
                try:
                    await self._record(owner, claim, batch, outcome)
                    return
                except (
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                    OSError,
                ) as error:
                    failures += 1
                    delay = backoff_delay(failures, 0.05, 2.0)
                    given_up = time.monotonic() + delay > deadline
                    log.warning(
                        "relay.record_failed",
                        command_id=str(claim.command_id),
                        error=f"{type(error).__name__}: {error}",
                        retrying=not given_up,
                    )
                    if given_up:
                        return
                    await asyncio.sleep(delay)
        except Exception:
            log.exception("relay.record_failed", command_id=str(claim.command_id))
        finally:
            self._set_busy(-1)

    async def _next_batch(self, owner: str, claim: Claim) -> Batch | None:
        """The events to send for ``claim``, or None (after releasing it) if none."""
        assert self._pool is not None
        settings = self.settings
        command_id = claim.command_id

        pending = claim.pending_first is not None and claim.pending_last is not None
        if pending and not claim.next_events:
            await self._pool.execute(queries.forget_pending, command_id, owner)
            return None

        # A batch chosen by an earlier claim (which failed or was cut short)
        # goes again as it was, so its delivery id does not change.
        if pending and not claim.chosen_now:
            return self._pending_batch(claim)

        # Late events (inside gaps skipped earlier) go first: they are the
        # oldest. The batch this claim chose instead was never sent.
        if claim.has_skipped_gaps:
            rows = await self._pool.fetch(
                queries.read_late_events,
                command_id,
                settings.relay_batch_max_events,
                settings.relay_batch_max_bytes,
            )
            rows = _leading_run(rows)
            if rows:
                return Batch(command_id, _to_events(command_id, rows, True), True)
        if pending:
            return self._pending_batch(claim)

        rows = claim.next_events
        if not rows:
            await self._pool.execute(queries.hold_command, command_id, owner, 0.0)
            return None

        # Sequence k missing while later ones are stored: hold, then skip it.
        first_stored = rows[0]["sequence"]
        expected = claim.delivered_through + 1
        if first_stored != expected and not await self._gap_expired(
            owner, claim, expected, first_stored
        ):
            return None
        return Batch(
            command_id, _to_events(command_id, _leading_run(rows), False), False
        )

    def _pending_batch(self, claim: Claim) -> Batch:
        assert claim.pending_last is not None
        late = claim.pending_last <= claim.delivered_through
        events = _to_events(claim.command_id, claim.next_events, late)
        return Batch(claim.command_id, events, late)

    async def _gap_expired(
        self, owner: str, claim: Claim, first_missing: int, next_stored: int
    ) -> bool:
        """Hold the command for a gap, or record the gap as skipped once held enough."""
        assert self._pool is not None
        command_id = claim.command_id
        last_missing = next_stored - 1
        async with self._pool.acquire() as connection, connection.transaction():
            held_seconds = await connection.fetchval(
                queries.open_gap, command_id, first_missing, last_missing
            )
            remaining = self.settings.relay_gap_hold - held_seconds
            if remaining > 0:
                await connection.execute(
                    queries.hold_command, command_id, owner, remaining
                )
                self._wake_after(remaining)
                log.debug(
                    "relay.gap_held",
                    command_id=str(command_id),
                    first_missing=first_missing,
                    last_missing=last_missing,
                )
                return False
            await connection.execute(
                queries.skip_gap, command_id, first_missing, last_missing
            )

        metrics.gaps_skipped.inc()
        log.warning(
            "relay.gap_skipped",
            command_id=str(command_id),
            first_missing=first_missing,
            last_missing=last_missing,
            held_seconds=round(held_seconds, 1),
        )
        return True

    async def _send(self, batch: Batch, claimed_at: float) -> Outcome:
        """POST the batch (or its events one by one); say how far it got."""
        if self.settings.relay_single_event_mode:
            return await self._send_one_by_one(batch, claimed_at)

        assert self._sink is not None
        delivery_id = delivery_id_for(batch.command_id, batch.first, batch.last)
        body = encode(
            DeliveryBatch(
                delivery_id=delivery_id,
                command_id=batch.command_id,
                events=batch.events,
                late=batch.late,
            )
        )
        try:
            status = await self._sink.deliver(delivery_id, body)
        except DeliveryError as error:
            return Outcome(0, error.status, error)
        return Outcome(len(batch.events), status, None)

    async def _send_one_by_one(self, batch: Batch, claimed_at: float) -> Outcome:
        """One request per event, stopping in time to record before the lease ends."""
        assert self._sink is not None
        settings = self.settings
        deadline = (
            claimed_at
            + settings.relay_lease_duration
            - settings.relay_request_timeout
            - LEASE_SAFETY_SECONDS
        )
        status: int | None = None
        for delivered, event in enumerate(batch.events):
            if delivered and time.monotonic() > deadline:
                return Outcome(delivered, status, None)
            delivery_id = delivery_id_for(
                batch.command_id, event.sequence, event.sequence
            )
            try:
                status = await self._sink.deliver(delivery_id, encode(event))
            except DeliveryError as error:
                return Outcome(delivered, error.status, error)
        return Outcome(len(batch.events), status, None)

    async def _record(
        self, owner: str, claim: Claim, batch: Batch, outcome: Outcome
    ) -> None:
        """Write down what the sink confirmed, then the failure if there was one."""
        assert self._pool is not None
        settings = self.settings
        delivered = batch.events[: outcome.delivered]
        failed = batch.events[outcome.delivered :]

        finishes = batch.late or any(event.kind == "exit" for event in delivered)
        # The usual outcome is one statement, committed on its own; several
        # statements (a partial run, a finished command) commit together.
        several = bool(delivered) and (bool(failed) or finishes)
        async with self._pool.acquire() as connection:
            transaction: contextlib.AbstractAsyncContextManager[Any] = (
                connection.transaction() if several else contextlib.nullcontext()
            )
            async with transaction:
                await self._record_outcome(
                    connection, owner, claim, batch, outcome, finishes
                )

        # Confirmed events count only once the record is committed.
        if delivered:
            now = time.time()
            for event in delivered:
                if event.stored_at is not None:
                    metrics.delivery_lag.observe(now - event.stored_at.timestamp())
            metrics.delivered_events.inc(len(delivered))
            if batch.late:
                metrics.late_events.inc(len(delivered))
            requests = 1 if not settings.relay_single_event_mode else len(delivered)
            metrics.deliveries.labels("delivered").inc(requests)

    async def _record_outcome(
        self,
        connection: asyncpg.Connection,
        owner: str,
        claim: Claim,
        batch: Batch,
        outcome: Outcome,
        finishes: bool,
    ) -> None:
        command_id = claim.command_id
        delivered = batch.events[: outcome.delivered]
        failed = batch.events[outcome.delivered :]
        if delivered:
            held = await self._record_delivered(
                connection, owner, claim, batch, delivered, outcome.status
            )
            if not held:
                return
            if finishes:
                await connection.execute(queries.finish_if_complete, command_id)
            # Progress was made: the failure below, if any, is a first one.
            claim = replace(
                claim,
                delivered_through=delivered[-1].sequence,
                attempts=0,
                failing_seconds=0.0,
            )

        if failed and outcome.error is not None:
            await self._record_failure(
                connection, owner, claim, batch, failed, outcome.error, outcome.retry_in
            )
        elif failed:
            # Stopped early to respect the lease: the rest is due again now.
            await connection.execute(queries.hold_command, command_id, owner, 0.0)

    async def _record_delivered(
        self,
        connection: asyncpg.Connection,
        owner: str,
        claim: Claim,
        batch: Batch,
        delivered: list[DeliveredEvent],
        status: int | None,
    ) -> bool:
        """Advance the cursor and log the requests; False if the lease was lost."""
        command_id = claim.command_id
        if self.settings.relay_single_event_mode:
            ranges = [(event.sequence, event.sequence) for event in delivered]
        else:
            ranges = [(delivered[0].sequence, delivered[-1].sequence)]
        held = await connection.fetchval(
            queries.record_delivered,
            command_id,
            owner,
            delivered[-1].sequence,
            status,
            [delivery_id_for(command_id, first, last) for first, last in ranges],
            [first for first, _ in ranges],
            [last for _, last in ranges],
            [last - first + 1 for first, last in ranges],
            batch.late,
            claim.attempts + 1,
        )
        if not held:
            # Our lease ran out and another worker took the command over; the
            # sink drops the duplicate by its delivery id, the new owner goes on.
            log.warning("relay.lease_lost", command_id=str(command_id), owner=owner)
            return False
        return True

    async def _record_failure(
        self,
        connection: asyncpg.Connection,
        owner: str,
        claim: Claim,
        batch: Batch,
        failed: list[DeliveredEvent],
        error: DeliveryError,
        delay: float,
    ) -> None:
        settings = self.settings
        command_id = claim.command_id
        failures = claim.attempts + 1
        first, last = failed[0].sequence, failed[-1].sequence
        reason = str(error)

        exhausted = (
            failures >= settings.relay_max_attempts
            or claim.failing_seconds >= settings.relay_max_age
        )
        if error.permanent or exhausted:
            await connection.execute(
                queries.park_dead, command_id, owner, error.status, reason, first, last
            )
            metrics.deliveries.labels("dead").inc()
            metrics.dead_commands.inc()
            log.error(
                "relay.command_dead",
                command_id=str(command_id),
                status=error.status,
                error=reason,
                attempts=failures,
                first_sequence=first,
                last_sequence=last,
            )
            return

        await connection.execute(
            queries.schedule_retry,
            command_id,
            owner,
            delay,
            error.status,
            reason,
            first,
            last,
        )
        # The database's clock started the delay first: wake after it is due.
        self._wake_after(delay)
        metrics.deliveries.labels("retried").inc()
        metrics.retries.inc()
        log.warning(
            "relay.delivery_failed",
            command_id=str(command_id),
            status=error.status,
            error=reason,
            attempt=failures,
            retry_in=round(delay, 3),
            first_sequence=first,
            last_sequence=last,
            late=batch.late,
        )


def _leading_run(rows: list[asyncpg.Record]) -> list[asyncpg.Record]:
    """The rows up to the first break in their sequence numbers."""
    for index in range(1, len(rows)):
        if rows[index]["sequence"] != rows[index - 1]["sequence"] + 1:
            return rows[:index]
    return rows


_payload_decoder = msgspec.json.Decoder(dict[str, Any])


def _to_events(
    command_id: uuid.UUID, rows: list[asyncpg.Record], late: bool
) -> list[DeliveredEvent]:
    return [
        DeliveredEvent(
            id=row["id"],
            command_id=command_id,
            sequence=row["sequence"],
            kind=row["kind"],
            stream=row["stream"],
            data=row["data"],
            payload=(
                None
                if row["payload"] is None
                else _payload_decoder.decode(row["payload"])
            ),
            emitted_at=row["emitted_at"],
            stored_at=row["stored_at"],
            late=late,
        )
        for row in rows
    ]
