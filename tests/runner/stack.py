"""Real processes and a TCP proxy for the runner's fault tests.

The broker and (where it must be killed) the runner run as their own
``runledger`` processes, so SIGKILL means what it says. The proxy belongs to
the test: it can cut every connection through it, or stop forwarding
without closing anything, as a dead network path does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import asyncpg

from core.settings import load_settings
from runner.settings import RunnerSettings

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def poll(
    condition: Callable[[], Any], *, within: float, every: float = 0.2
) -> Any:
    """Call ``condition`` (sync or async) until it returns a true value."""
    async with asyncio.timeout(within):
        while True:
            value = condition()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(every)


def fast_settings(
    broker_url: str, token: str, spool: Path, **overrides: Any
) -> RunnerSettings:
    """Runner settings with short timeouts, for an in-process runner."""
    values: dict[str, Any] = {
        "broker_url": broker_url,
        "token": token,
        "spool_path": spool,
        "reconnect_initial": 0.2,
        "reconnect_max": 1.0,
        "ping_interval": 1.0,
        "ping_timeout": 2.0,
        "acknowledge_timeout": 5.0,
        "compression": False,
    }
    values.update(overrides)
    return load_settings(RunnerSettings, values, environ={})


class RunledgerProcess:
    """One ``python -m runledger ...`` process with its log in a file."""

    def __init__(self, argv: list[str], log_path: Path, env: Mapping[str, str]) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = {**os.environ, "RUNLEDGER_LOG_LEVEL": "INFO", **env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "runledger", *self.argv],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop within 20 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class BrokerProcess(RunledgerProcess):
    """``runledger broker`` on a fixed port, so it can come back at the same URL."""

    def __init__(
        self, database_url: str, port: int, log_path: Path, *extra: str
    ) -> None:
        super().__init__(
            ["broker", "--port", str(port), *extra],
            log_path,
            {"DATABASE_URL": database_url},
        )
        self.port = port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start_and_wait(self) -> None:
        """Start, and return once the port accepts connections."""
        self.start()

        async def accepting() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"broker exited:\n{self.log_text()[-3000:]}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            return True

        await poll(accepting, within=60)


class RunnerProcess(RunledgerProcess):
    """``runledger runner`` with a spool file, settings through the environment."""

    def __init__(
        self,
        broker_url: str,
        token: str,
        spool_path: Path,
        log_path: Path,
        **settings: object,
    ) -> None:
        env = {f"RUNLEDGER_{k.upper()}": str(v) for k, v in settings.items()}
        env["RUNLEDGER_TOKEN"] = token
        super().__init__(
            ["runner", "--broker-url", broker_url, "--spool", str(spool_path)],
            log_path,
            env,
        )


class TcpProxy:
    """Forwards loopback connections to a target port; cuts or stalls on demand."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._pumps: set[asyncio.Task[None]] = set()
        self._stalled: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pumps):
            task.cancel()

    def drop(self) -> None:
        """Close every current connection at once, both sides (a reset)."""
        for client, upstream in self._links:
            for writer in (client, upstream):
                with contextlib.suppress(Exception):
                    writer.transport.abort()
        self._links.clear()

    def stall(self) -> None:
        """Stop forwarding on every current connection, closing nothing.

        New connections are forwarded normally, as after a route change.
        """
        for client, upstream in self._links:
            self._stalled.update((client, upstream))
            for writer in (client, upstream):
                # A socket's transport reads too; the stream API types it write-only.
                cast(asyncio.Transport, writer.transport).pause_reading()

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            client_writer.transport.abort()
            return
        self._links.append((client_writer, upstream_writer))
        for reader, writer in (
            (client_reader, upstream_writer),
            (upstream_reader, client_writer),
        ):
            task = asyncio.create_task(self._pump(reader, writer))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(Exception):
            while True:
                data = await reader.read(65536)
                if not data or writer in self._stalled:
                    break
                writer.write(data)
                await writer.drain()
        if writer not in self._stalled:
            with contextlib.suppress(Exception):
                writer.close()


async def stored_events(pool: asyncpg.Pool, command_id: uuid.UUID) -> list[Any]:
    """The command's stored events in sequence order (payload decoded)."""
    rows = await pool.fetch(
        "SELECT sequence, id, kind, stream, data, payload FROM events"
        " WHERE command_id = $1 ORDER BY sequence",
        command_id,
    )
    return [
        {
            **dict(row),
            "payload": None if row["payload"] is None else json.loads(row["payload"]),
        }
        for row in rows
    ]


async def stored_count(pool: asyncpg.Pool, command_id: uuid.UUID) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM events WHERE command_id = $1", command_id
    )
    return count


def process_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (gone, or a zombie nobody reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return status.rsplit(")", 1)[1].split()[0] in ("Z", "X")
