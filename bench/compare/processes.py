"""Starting the services a scenario needs as processes of their own.

Each server runs in its own process, so its CPU and memory are measured
apart from the load generator's and the two do not share an event loop. A
server prints ``port N`` once listening; :func:`start_server_process` waits
for that line (bounded) and returns the process and the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0


@dataclass
class ServerProcess:
    """A started server process and the port it listens on."""

    name: str
    process: asyncio.subprocess.Process
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended within a bound."""
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


def python_module(module: str, *args: str) -> list[str]:
    """The argv that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


async def start_server_process(
    name: str, argv: Sequence[str], env: dict[str, str] | None = None
) -> ServerProcess:
    """Start ``argv`` and wait for its ``port N`` line; raise if it never comes."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=environment,
        cwd=str(ROOT),
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            while True:
                line = await process.stdout.readline()
                if not line:
                    raise RuntimeError(f"{name} exited before listening")
                if line.startswith(b"port "):
                    port = int(line.split()[1])
                    break
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    return ServerProcess(name, process, port)


class ProcessGroup:
    """Server processes stopped together, newest first, however the block ends."""

    def __init__(self) -> None:
        self._processes: list[ServerProcess] = []

    async def __aenter__(self) -> ProcessGroup:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for process in reversed(self._processes):
            await process.stop()
        self._processes.clear()

    def add(self, *processes: ServerProcess) -> None:
        """Stop ``processes`` with the group."""
        self._processes.extend(processes)
