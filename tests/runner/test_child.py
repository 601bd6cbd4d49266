"""Running a child process: exact bytes, hashes, exit status, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import sys

import pytest

from runner.child import Child, describe_exit


class Collected:
    """The chunks a child emitted, per stream."""

    def __init__(self, delay: float = 0.0) -> None:
        self.chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.delay = delay
        self.arrived = asyncio.Event()

    async def __call__(self, stream: str, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if self.delay:
                await asyncio.sleep(self.delay)
            self.chunks[stream].append(chunk)
        self.arrived.set()

    async def until(self, stream: str, wanted: bytes) -> None:
        """Wait (at most 10 s) until ``wanted`` appears in ``stream``."""
        async with asyncio.timeout(10):
            while wanted not in self.joined(stream):
                self.arrived.clear()
                await self.arrived.wait()

    def joined(self, stream: str) -> bytes:
        return b"".join(self.chunks[stream])


def make_child(program: str, emit: Collected, **options: float) -> Child:
    return Child(
        [sys.executable, "-c", program],
        cwd=None,
        env={},
        emit=emit,
        chunk_bytes=lambda: int(options.get("chunk_bytes", 4096)),
        chunk_seconds=0.05,
        cancel_grace=options.get("cancel_grace", 1.0),
    )


async def test_streams_are_read_apart_and_hashed() -> None:
    """stdout and stderr are kept apart; counts and SHA-256 are of what was written."""
    program = (
        "import sys\n"
        "sys.stdout.buffer.write(b'\\x00out\\xff' * 5000)\n"
        "sys.stderr.buffer.write(b'err\\r' * 3000)\n"
    )
    emitted = Collected()
    child = make_child(program, emitted)
    await child.start()
    outcome = await child.finish()

    assert emitted.joined("stdout") == b"\x00out\xff" * 5000
    assert emitted.joined("stderr") == b"err\r" * 3000
    assert max(len(c) for c in emitted.chunks["stdout"]) <= 4096
    assert outcome.status == "succeeded" and outcome.exit_code == 0
    assert outcome.streams["stdout"] == {
        "bytes": 25000,
        "sha256": hashlib.sha256(b"\x00out\xff" * 5000).hexdigest(),
    }
    assert outcome.streams["stderr"]["bytes"] == 12000


async def test_a_slow_consumer_blocks_the_child() -> None:
    """While emit waits, the pipes are not read, so the child cannot run ahead."""
    program = (
        "import sys, time\n"
        "for _ in range(64):\n"
        "    sys.stdout.buffer.write(b'x' * 65536)\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write(str(time.monotonic()))\n"
    )
    emitted = Collected(delay=0.05)
    child = make_child(program, emitted, chunk_bytes=65536)
    started = asyncio.get_running_loop().time()
    await child.start()
    outcome = await child.finish()

    # 4 MiB through a 64 KiB pipe with 50 ms per chunk: the child was held back.
    assert asyncio.get_running_loop().time() - started > 1.5
    assert emitted.joined("stdout") == b"x" * 65536 * 64
    assert outcome.status == "succeeded"


async def test_cancel_stops_a_cooperative_child_with_term() -> None:
    """A child that obeys TERM ends as cancelled with the signal in the reason."""
    emitted = Collected()
    child = make_child("import time; print('up', flush=True); time.sleep(60)", emitted)
    await child.start()
    finishing = asyncio.create_task(child.finish())
    await emitted.until("stdout", b"up\n")
    child.cancel("cancelled on request")
    outcome = await asyncio.wait_for(finishing, 10)
    assert outcome.status == "cancelled"
    assert outcome.reason == "cancelled on request; killed by SIGTERM"


async def test_cancel_reaches_grandchildren() -> None:
    """TERM goes to the process group, so a shell's children stop too."""
    emitted = Collected()
    child = Child(
        ["sh", "-c", "sleep 60 & echo started; wait"],
        cwd=None,
        env={},
        emit=emitted,
        chunk_bytes=lambda: 4096,
        chunk_seconds=0.05,
        cancel_grace=1.0,
    )
    await child.start()
    finishing = asyncio.create_task(child.finish())
    await emitted.until("stdout", b"started")
    child.cancel("stop")
    # finish() waits for EOF on the pipes, which the grandchild holds open.
    outcome = await asyncio.wait_for(finishing, 10)
    assert outcome.status == "cancelled"


async def test_cancel_before_start_applies_once_started() -> None:
    """A cancel that arrives while the child starts is not lost."""
    emitted = Collected()
    child = make_child("import time; time.sleep(60)", emitted)
    child.cancel("early")
    await child.start()
    outcome = await asyncio.wait_for(child.finish(), 10)
    assert outcome.status == "cancelled"


@pytest.mark.parametrize(
    ("returncode", "cancelled", "expected"),
    [
        (0, None, ("succeeded", 0, None)),
        (2, None, ("failed", 2, None)),
        (-11, None, ("failed", None, "killed by SIGSEGV")),
        (-15, "asked", ("cancelled", None, "asked; killed by SIGTERM")),
        (0, "asked", ("cancelled", 0, "asked; exited with code 0")),
    ],
)
def test_exit_descriptions(
    returncode: int, cancelled: str | None, expected: tuple[object, ...]
) -> None:
    """Exit codes and signals map to status, exit code and reason."""
    outcome = describe_exit(returncode, cancelled)
    assert (outcome.status, outcome.exit_code, outcome.reason) == expected
