"""Running one command's child process and reading its output byte for byte.

The child gets its own session (so a cancel reaches its whole process group)
and, on Linux, is killed by the kernel if the runner dies, so no orphan keeps
running unobserved. Its standard output and error are read as raw bytes,
hashed and counted as read, cut into chunks and handed to ``emit``, which may
take its time: while it waits, the pipes are not read and the child blocks on
write. That is the runner's backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runner.chunker import Chunker

EmitOutput = Callable[[str, list[bytes]], Awaitable[None]]

# Bytes asked of a pipe per read; the chunker cuts them to the event size.
READ_BYTES = 64 * 1024

_PR_SET_PDEATHSIG = 1
# Looked up once here: the function below runs between fork and exec, where
# loading a library could deadlock on a lock another thread held at fork.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    # Runs in the forked child before exec: ask the kernel for SIGKILL when the
    # runner goes away, so a killed runner leaves no child writing into a void.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class StreamTally:
    """Bytes read from one stream and their SHA-256, as the child wrote them."""

    byte_count: int = 0
    digest: Any = field(default_factory=hashlib.sha256)

    def add(self, data: bytes) -> None:
        self.byte_count += len(data)
        self.digest.update(data)

    def as_payload(self) -> dict[str, Any]:
        return {"bytes": self.byte_count, "sha256": self.digest.hexdigest()}


@dataclass(frozen=True)
class ChildOutcome:
    """How a child ended, in the shape of the ``exit`` event's payload."""

    status: str
    exit_code: int | None
    reason: str | None
    streams: dict[str, dict[str, Any]]

    def as_payload(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "streams": self.streams,
        }


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(returncode: int, cancelled_because: str | None) -> ChildOutcome:
    """The status, exit code and reason for a child that ended with ``returncode``.

    Streams are left empty; the caller adds them.
    """
    if returncode < 0:
        exit_code = None
        ended = f"killed by {_signal_name(-returncode)}"
    else:
        exit_code = returncode
        ended = f"exited with code {returncode}"
    if cancelled_because is not None:
        return ChildOutcome("cancelled", exit_code, f"{cancelled_because}; {ended}", {})
    if returncode == 0:
        return ChildOutcome("succeeded", 0, None, {})
    return ChildOutcome("failed", exit_code, None if returncode > 0 else ended, {})


class Child:
    """One command's child process, from start to its outcome."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None,
        env: Mapping[str, str],
        emit: EmitOutput,
        chunk_bytes: Callable[[], int],
        chunk_seconds: float,
        cancel_grace: float,
    ) -> None:
        self.argv = list(argv)
        self.cwd = cwd
        self.env = dict(env)
        self._emit = emit
        self._chunk_bytes = chunk_bytes
        self._chunk_seconds = chunk_seconds
        self._cancel_grace = cancel_grace
        self._process: asyncio.subprocess.Process | None = None
        self._cancelled_because: str | None = None
        self._stopper: asyncio.Task[None] | None = None
        self.tallies = {"stdout": StreamTally(), "stderr": StreamTally()}

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self) -> int:
        """Start the child; return its pid. Raises OSError if it cannot start."""
        self._process = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent if _prctl is not None else None,
        )
        # A cancel that came while the child was starting applies now.
        if self._cancelled_because is not None:
            self._stopper = asyncio.create_task(self._terminate_then_kill())
        return self._process.pid

    async def finish(self) -> ChildOutcome:
        """Read both streams to their end, wait for the child, and say how it ended."""
        process = self._process
        assert process is not None and process.stdout and process.stderr
        await asyncio.gather(
            self._read("stdout", process.stdout), self._read("stderr", process.stderr)
        )
        returncode = await process.wait()
        if self._stopper is not None:
            self._stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stopper

        outcome = describe_exit(returncode, self._cancelled_because)
        return ChildOutcome(
            outcome.status,
            outcome.exit_code,
            outcome.reason,
            {name: tally.as_payload() for name, tally in self.tallies.items()},
        )

    def cancel(self, because: str) -> None:
        """Stop the child: TERM to its process group, KILL after the grace period.

        Before the child has started, the cancel is remembered and applied as
        soon as it has; after it has ended, a cancel changes nothing.
        """
        if self._cancelled_because is not None:
            return
        if self._process is not None and self._process.returncode is not None:
            return
        self._cancelled_because = because
        if self._process is not None:
            self._stopper = asyncio.create_task(self._terminate_then_kill())

    async def _terminate_then_kill(self) -> None:
        process = self._process
        assert process is not None
        self._signal_group(signal.SIGTERM)
        try:
            async with asyncio.timeout(self._cancel_grace):
                await process.wait()
        except TimeoutError:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, number: int) -> None:
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, number)

    async def _read(self, stream: str, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        chunker = Chunker(self._chunk_bytes(), self._chunk_seconds)
        tally = self.tallies[stream]

        while True:
            # Held-back bytes must go out when their window ends, even if the
            # child then stays quiet, so wait for more output only until then.
            # (asyncio.timeout, not wait_for: on Python 3.11 wait_for can
            # swallow a cancel that coincides with the read finishing.)
            try:
                async with asyncio.timeout_at(chunker.deadline):
                    data = await reader.read(READ_BYTES)
            except TimeoutError:
                held = chunker.flush()
                if held:
                    await self._emit(stream, [held])
                continue
            if not data:
                break

            tally.add(data)
            chunker.chunk_bytes = self._chunk_bytes()
            ready = chunker.add(data, loop.time())
            if ready:
                await self._emit(stream, ready)

        rest = chunker.flush()
        if rest:
            await self._emit(stream, [rest])
