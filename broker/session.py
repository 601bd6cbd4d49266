"""One runner's WebSocket connection to the broker, after the upgrade.

Three tasks serve a connection:

- the reader (the connection handler itself) reads frames, checks them and
  hands their events to the writer; it waits while the writer's queue or
  the connection's in-flight window is full, so a slow Postgres stops the
  broker reading instead of growing its memory;
- the acknowledger waits for each frame's commit, in order, and sends its
  ``event-ack``;
- the dispatcher sends commands and cancels when woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from broker import metrics
from broker.dispatch import dispatch_pending
from broker.frames import RateLimiter, decode_frame
from broker.ingest import IngestWriter, Submission
from broker.settings import BrokerSettings
from core import wire
from core.errors import DatabaseError, LimitExceeded, ProtocolError
from core.logging import get_logger

log = get_logger("broker")

CLOSE_FENCED = 4001
DISPATCH_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class RunnerIdentity:
    """The runner a token belongs to."""

    id: uuid.UUID
    name: str


class FaultHook:
    """Tests only: drop connections after commit and before acknowledgement."""

    def __init__(self, crashes: int) -> None:
        self.remaining = crashes

    def should_crash(self) -> bool:
        """True (and one fewer left) while crashes remain."""
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


class RunnerSession:
    """The broker's side of one runner connection; see the module docstring."""

    def __init__(
        self,
        connection: ServerConnection,
        runner: RunnerIdentity,
        connection_epoch: int,
        *,
        settings: BrokerSettings,
        limits: wire.Limits,
        writer: IngestWriter,
        pool: asyncpg.Pool,
        fault_hook: FaultHook,
    ) -> None:
        self.connection = connection
        self.runner = runner
        self.runner_id = runner.id
        self.connection_epoch = connection_epoch
        self.cancels_sent: set[uuid.UUID] = set()
        self._settings = settings
        self._limits = limits
        self._writer = writer
        self._pool = pool
        self._fault_hook = fault_hook
        self._rate = RateLimiter(settings.max_events_per_second)
        self._in_flight = asyncio.Semaphore(settings.session_frames_in_flight)
        self._awaiting_acknowledgement: asyncio.Queue[Submission] = asyncio.Queue()
        self._dispatch_wanted = asyncio.Event()
        self._fenced = False
        self._tasks: list[asyncio.Task[None]] = []
        self._log = log.bind(runner_id=str(runner.id), runner=runner.name)

    async def run(self) -> None:
        """Serve the connection until it closes; never raises for the peer's faults."""
        hello = wire.Hello(
            runner_id=self.runner.id,
            runner_name=self.runner.name,
            connection_epoch=self.connection_epoch,
            limits=self._limits,
        )
        self._tasks = [
            asyncio.create_task(self._acknowledge_loop(), name="broker-acknowledge"),
            asyncio.create_task(self._dispatch_loop(), name="broker-dispatch"),
        ]
        try:
            await self.send_message(hello)
            await self._read_loop()
        except ConnectionClosed:
            pass
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task

            # Frames still with the writer are stored all the same; nobody is
            # left to hear how it went, and the runner resends them.
            while not self._awaiting_acknowledgement.empty():
                orphan = self._awaiting_acknowledgement.get_nowait()
                orphan.outcome.add_done_callback(_ignore_outcome)

    def request_dispatch(self) -> None:
        """Wake the dispatcher (a command or cancel for this runner arrived)."""
        self._dispatch_wanted.set()

    async def fence(self) -> None:
        """Close this connection because a newer one of the same runner took over."""
        self._fenced = True
        self._log.info("broker.connection_fenced", epoch=self.connection_epoch)
        await self.connection.close(
            CLOSE_FENCED, "a newer connection of this runner took over"
        )

    async def send_message(self, message: msgspec.Struct) -> None:
        """Send one wire message as a text frame."""
        await self.connection.send(wire.encode(message), text=True)

    async def _read_loop(self) -> None:
        while True:
            frame = await self.connection.recv(decode=False)
            if self._fenced:
                return
            received_at = time.perf_counter()
            try:
                await self._handle_frame(frame, received_at)
            except ProtocolError as error:
                metrics.FRAMES_REFUSED.labels(error.code).inc()
                self._log.info("broker.frame_refused", code=error.code)
                await self.send_message(wire.ErrorMessage(error.code, error.reason))

    async def _handle_frame(self, frame: bytes | str, received_at: float) -> None:
        raw = frame.encode() if isinstance(frame, str) else frame
        decoded = decode_frame(raw, self._limits)
        metrics.EVENTS_RECEIVED.inc(decoded.received_events)

        if decoded.command_started is not None:
            self._log.debug(
                "broker.command_started",
                command_id=str(decoded.command_started.command_id),
            )
            return
        if not self._rate.try_take(decoded.received_events):
            raise LimitExceeded(
                "rate_limited",
                f"over the limit of {self._rate.events_per_second} events per "
                "second (max_events_per_second); resend this frame later",
            )

        # The in-flight window bounds what one connection holds in memory;
        # the writer's queue bounds all of them together.
        await self._in_flight.acquire()
        submission = Submission(
            runner_id=self.runner_id,
            connection_epoch=self.connection_epoch,
            events=decoded.events,
            refused=decoded.refused,
            received_at=received_at,
        )
        self._awaiting_acknowledgement.put_nowait(submission)
        await self._writer.submit(submission)

    async def _acknowledge_loop(self) -> None:
        while True:
            submission = await self._awaiting_acknowledgement.get()
            try:
                outcome = await submission.outcome
            except DatabaseError as error:
                self._in_flight.release()
                await self.send_message(wire.ErrorMessage("storage_failed", str(error)))
                continue

            if self._fault_hook.should_crash():
                self._log.warning("broker.fault_crash_before_acknowledge")
                self.connection.transport.abort()
                return
            if outcome.fenced:
                self._in_flight.release()
                await self.send_message(
                    wire.ErrorMessage(
                        "fenced", "a newer connection of this runner took over"
                    )
                )
                await self.fence()
                return

            await self.send_message(
                wire.EventAck(
                    acknowledged=outcome.acknowledged, refused=outcome.refused
                )
            )
            self._in_flight.release()
            metrics.ACKNOWLEDGE_LATENCY.observe(
                time.perf_counter() - submission.received_at
            )
            if outcome.refused:
                self._log.info(
                    "broker.events_refused",
                    count=len(outcome.refused),
                    codes=sorted({refused.code for refused in outcome.refused}),
                )

    async def _dispatch_loop(self) -> None:
        catch_up = True
        self._dispatch_wanted.set()
        while True:
            await self._dispatch_wanted.wait()
            self._dispatch_wanted.clear()
            try:
                await dispatch_pending(self._pool, self, catch_up=catch_up)
                catch_up = False
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
                self._log.warning("broker.dispatch_failed", error=str(error))
                await asyncio.sleep(DISPATCH_RETRY_SECONDS)
                self._dispatch_wanted.set()


def _ignore_outcome(outcome: asyncio.Future[Any]) -> None:
    if not outcome.cancelled():
        outcome.exception()
