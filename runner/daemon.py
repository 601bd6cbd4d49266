"""The runner daemon: accepts commands, runs them, and spools their events.

:class:`Runner` is a service (``start``/``stop``) that ``runledger runner``
runs on its own and ``runledger dev`` runs beside the broker in one event
loop. It owns the spool and the link to the broker; each command it accepts
becomes a child process whose output is chunked and spooled as events:

    status (sequence 1, ``{"status": "running", "pid": n}``),
    output ... (stdout and stderr, bytes as written),
    exit (the last: status, exit code, reason, bytes and SHA-256 per stream).

Output waits while the spool is over its disk budget, so the child blocks on
write instead of anything being dropped. On start, commands whose child died
with an earlier runner process get an ``exit`` event with status ``lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from typing import Any

from core import wire
from core.logging import get_logger
from runner.child import Child, ChildOutcome
from runner.chunker import largest_chunk_for
from runner.connection import BrokerLink, Signal
from runner.settings import RunnerSettings
from runner.spool import Spool, UnfinishedCommand

log = get_logger("runner")

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@dataclass(frozen=True)
class RunnerState:
    """What a person wants to know about a runner at a glance."""

    connected: bool
    running: int
    spooled: int
    spooled_bytes: int
    unacknowledged: int
    refused: int


def lost_exit_payload(command: UnfinishedCommand) -> dict[str, Any]:
    """The ``exit`` payload of a command whose child died with its runner.

    The SHA-256 of what the child wrote died with the runner's memory, so
    each stream gives only its byte count, that of the output spooled before
    the runner stopped (readers then treat the hash as unknown).
    """
    if command.pid is None:
        reason = "the runner stopped before the child started"
    else:
        reason = (
            f"the runner stopped while the child (pid {command.pid}) ran; "
            "output it wrote after the last spooled event is unknown"
        )
    return {
        "status": "lost",
        "exit_code": None,
        "reason": reason,
        "streams": {
            "stdout": {"bytes": command.stdout_bytes},
            "stderr": {"bytes": command.stderr_bytes},
        },
    }


class Runner:
    """The runner service: spool, broker link, and the children of commands."""

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings
        self._spool: Spool | None = None
        self._link: BrokerLink | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._children: dict[uuid.UUID, Child] = {}
        self._command_tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._chunk_bytes = settings.chunk_bytes
        self._settled = Signal()
        self._connected = Signal()
        self._waiting_for_room = False
        self._stopping = False

    # Service

    async def start(self) -> None:
        """Open the spool, close out lost commands, and start talking to the broker.

        Returns at once; the link connects (and reconnects) in the background.
        Raises SpoolError when the spool cannot be opened.
        """
        self._spool = Spool.open(
            self.settings.spool_path,
            self.settings.spool_bytes_limit,
            synchronous=self.settings.spool_synchronous,
        )
        self._record_lost_commands()
        self._link = BrokerLink(self.settings, self._spool, self)
        self._link_task = asyncio.create_task(self._link.run(), name="runner-link")
        figures = self._spool.figures()
        log.info(
            "runner.started",
            broker_url=self.settings.broker_url,
            spool=str(self.settings.spool_path),
            spooled=figures.spooled,
            refused=figures.refused,
        )

    async def stop(self) -> None:
        """Stop the children, give the broker a moment to take what is left, close.

        Children are cancelled (TERM, then KILL after the grace period) and
        end with status ``cancelled``. What the broker has not acknowledged
        within ``stop_flush_seconds`` stays in the spool for the next start.
        """
        if self._spool is None:
            return
        self._stopping = True

        for child in self._children.values():
            child.cancel("the runner was stopped")
        if self._command_tasks:
            _, unfinished = await asyncio.wait(
                list(self._command_tasks.values()),
                timeout=self.settings.cancel_grace + 5,
            )
            # Stuck (its output waiting for room that never came): give up on
            # it; its exit is not spooled, so the next start reports it lost.
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)

        # Let the link send the exit events and the rest, for a bounded time.
        if self._link is not None and self._link.connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.stop_flush_seconds):
                    await self._wait_until(lambda spool: spool.spooled_count == 0)

        if self._link_task is not None:
            self._link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._link_task
        if self._link is not None:
            await self._link.close()
        figures = self._spool.figures()
        self._spool.close()
        self._spool = None
        log.info("runner.stopped", spooled=figures.spooled, refused=figures.refused)

    # What people and tests ask

    def state(self) -> RunnerState:
        """Connected or not, commands running, events spooled/unacknowledged/refused."""
        spool = self._require_spool()
        figures = spool.figures()
        return RunnerState(
            connected=self._link is not None and self._link.connected,
            running=len(self._children),
            spooled=figures.spooled,
            spooled_bytes=figures.spooled_bytes,
            unacknowledged=0 if self._link is None else self._link.unacknowledged,
            refused=figures.refused,
        )

    async def wait_connected(self) -> None:
        """Return once the broker has said hello on the current connection."""
        while True:
            armed = self._connected.armed()
            if self._link is not None and self._link.connected:
                return
            await armed.wait()

    async def wait_acknowledged(self, command_id: uuid.UUID) -> None:
        """Return once ``command_id`` has ended and all its events are settled.

        Settled means acknowledged by the broker or refused and moved aside.
        Wrap it in ``asyncio.timeout`` to bound the wait.
        """
        await self._wait_until(
            lambda spool: (
                spool.is_finished(command_id) and not spool.has_pending(command_id)
            )
        )

    # The link's callbacks

    def link_connected(self, limits: wire.Limits) -> None:
        self._chunk_bytes = largest_chunk_for(limits, self.settings.chunk_bytes)
        self._connected.notify()

    def command_received(self, message: wire.CommandMessage) -> None:
        spool = self._require_spool()
        # A broker may send a command again (after a reconnect, say); it runs once.
        if self._stopping or spool.is_known(message.command_id):
            log.debug("runner.command_repeated", command_id=str(message.command_id))
            return
        spool.accept_command(message.command_id)
        task = asyncio.create_task(self._run_command(message))
        self._command_tasks[message.command_id] = task
        task.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task[None]) -> None:
        for command_id, known in list(self._command_tasks.items()):
            if known is task:
                del self._command_tasks[command_id]
        if not task.cancelled() and task.exception() is not None:
            # The spool could not be written (disk full, say): the command's
            # end is unknown and a restart will report it lost.
            log.error(
                "runner.command_aborted",
                error=str(task.exception()),
                hint="check the disk holding the spool",
            )

    def cancel_received(self, message: wire.CancelMessage) -> None:
        child = self._children.get(message.command_id)
        if child is None:
            log.debug("runner.cancel_ignored", command_id=str(message.command_id))
            return
        log.info("runner.command_cancelling", command_id=str(message.command_id))
        child.cancel("cancelled on request")

    def events_settled(self) -> None:
        self._settled.notify()

    # Running one command

    async def _run_command(self, message: wire.CommandMessage) -> None:
        command_id = message.command_id

        async def emit(stream: str, chunks: list[bytes]) -> None:
            await self._append_output(command_id, stream, chunks)

        child = Child(
            message.argv,
            cwd=message.cwd,
            env=message.env,
            emit=emit,
            chunk_bytes=lambda: self._chunk_bytes,
            chunk_seconds=self.settings.chunk_seconds,
            cancel_grace=self.settings.cancel_grace,
        )
        self._children[command_id] = child
        try:
            outcome = await self._start_and_finish(command_id, child)
        finally:
            self._children.pop(command_id, None)
        self._append(command_id, "exit", payload=outcome.as_payload())
        log.info(
            "runner.command_finished",
            command_id=str(command_id),
            status=outcome.status,
            exit_code=outcome.exit_code,
            stdout_bytes=outcome.streams["stdout"]["bytes"],
            stderr_bytes=outcome.streams["stderr"]["bytes"],
        )

    async def _start_and_finish(
        self, command_id: uuid.UUID, child: Child
    ) -> ChildOutcome:
        spool = self._require_spool()
        try:
            pid = await child.start()
        except OSError as error:
            reason = f"cannot start {child.argv[0]!r}: {error.strerror or error}"
            log.warning("runner.command_not_started", command_id=str(command_id))
            empty = {"bytes": 0, "sha256": EMPTY_SHA256}
            return ChildOutcome(
                "failed", None, reason, {"stdout": empty, "stderr": dict(empty)}
            )

        spool.record_pid(command_id, pid)
        self._append(command_id, "status", payload={"status": "running", "pid": pid})
        log.info("runner.command_started", command_id=str(command_id), pid=pid)
        if self._link is not None:
            await self._link.send_notice(wire.CommandStarted(command_id, pid))
        return await child.finish()

    async def _append_output(
        self, command_id: uuid.UUID, stream: str, chunks: list[bytes]
    ) -> None:
        # Backpressure: while the spool is over budget the reader waits here,
        # so the pipe fills and the child blocks on write.
        spool = self._require_spool()
        size = sum(Spool.size_of(chunk) for chunk in chunks)
        while not spool.has_room(size):
            if not self._waiting_for_room:
                self._waiting_for_room = True
                log.warning(
                    "runner.spool_full",
                    spooled_bytes=spool.spooled_bytes,
                    spool_bytes_limit=spool.bytes_limit,
                )
            armed = self._settled.armed()
            if spool.has_room(size):
                break
            await armed.wait()
        if self._waiting_for_room:
            self._waiting_for_room = False
            log.info("runner.spool_room", spooled_bytes=spool.spooled_bytes)
        spool.append_output(command_id, stream, chunks)
        if self._link is not None:
            self._link.wake.notify()

    def _append(
        self,
        command_id: uuid.UUID,
        kind: str,
        *,
        stream: str | None = None,
        data: bytes = b"",
        payload: dict[str, Any] | None = None,
    ) -> None:
        # Status and exit events are small and never wait for room, so a
        # command can always end even with a full spool.
        self._require_spool().append(
            command_id, kind, stream=stream, data=data, payload=payload
        )
        if self._link is not None:
            self._link.wake.notify()
        if kind == "exit":
            self._settled.notify()

    # Plumbing

    def _record_lost_commands(self) -> None:
        spool = self._require_spool()
        for command in spool.unfinished_commands():
            payload = lost_exit_payload(command)
            spool.append(command.command_id, "exit", payload=payload)
            log.warning(
                "runner.command_lost",
                command_id=str(command.command_id),
                pid=command.pid,
                reason=payload["reason"],
            )

    async def _wait_until(self, condition: Any) -> None:
        while True:
            armed = self._settled.armed()
            if condition(self._require_spool()):
                return
            await armed.wait()

    def _require_spool(self) -> Spool:
        if self._spool is None:
            raise RuntimeError("the runner is not started")
        return self._spool
