"""The soak's processes: embedded Postgres, broker, relay, web tier, runners.

Every part runs as the ``runledger`` command would run it in production, in
a process of its own, so a fault is a real SIGKILL. Ports are chosen once,
so a restarted broker or web tier comes back where its clients look for it.
Each process logs to its own file in the soak's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.soak.proxy import SinkProxy, TcpProxy
from core.embedded import start_embedded_postgres
from core.logging import get_logger
from core.migrate import upgrade
from core.tokens import hash_token, new_token

log = get_logger("soak")

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
CHUNK_BYTES = 256
RELAY_REQUEST_TIMEOUT_SECONDS = 2.0


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def port_open(port: int) -> bool:
    """Whether something accepts connections on loopback ``port``."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@dataclass
class ManagedProcess:
    """One ``runledger`` process that the soak can kill and start again."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    port: int | None = None
    process: asyncio.subprocess.Process | None = None
    starts: int = 0

    async def start(self) -> None:
        """Start it and, when it listens, wait until its port accepts."""
        log = self.log_path.open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                cwd=str(ROOT),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        self.starts += 1
        if self.port is None:
            return
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not await port_open(self.port):
            if self.process.returncode is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen; see {self.log_path}")
            await asyncio.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def kill(self) -> None:
        """SIGKILL, as a crash or an out-of-memory kill would."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a bound."""
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            await self.kill()


def runledger_argv(*args: str) -> list[str]:
    """``runledger ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "runledger", *args]


@dataclass
class SoakRunner:
    """A registered runner and its daemon process."""

    name: str
    id: uuid.UUID
    token: str
    process: ManagedProcess


@dataclass
class Cluster:
    """Everything the soak runs; ``start()`` brings it up, ``stop()`` down."""

    workdir: Path
    runner_count: int
    database_url: str = ""
    signing_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    api_token: str = field(default_factory=lambda: new_token("rla_"))
    broker: ManagedProcess | None = None
    relay: ManagedProcess | None = None
    web: ManagedProcess | None = None
    runners: list[SoakRunner] = field(default_factory=list)
    runner_proxy: TcpProxy | None = None
    sink_proxy: SinkProxy | None = None
    pool: asyncpg.Pool | None = None

    @property
    def pgdata(self) -> Path:
        return self.workdir / "pgdata"

    def _env(self, **settings: str) -> dict[str, str]:
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RUNLEDGER_", "PG", "DATABASE_URL"))
        }
        environment.update(
            {
                "PYTHONPATH": str(ROOT),
                "DATABASE_URL": self.database_url,
                "RUNLEDGER_LOG_LEVEL": "WARNING",
            }
        )
        environment.update({f"RUNLEDGER_{k.upper()}": v for k, v in settings.items()})
        return environment

    async def start(self) -> None:
        """Start Postgres and the schema, then each part and its proxy, then runners."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.database_url = await asyncio.to_thread(
            start_embedded_postgres, self.pgdata
        )
        await asyncio.to_thread(upgrade, self.database_url)
        self.pool = await asyncpg.create_pool(self.database_url, min_size=1, max_size=4)

        web_port = free_port()
        self.web = ManagedProcess(
            "web",
            runledger_argv("web", "--port", str(web_port)),
            self._env(signing_secret=self.signing_secret, api_token=self.api_token),
            self.workdir / "web.log",
            port=web_port,
        )
        await self.web.start()
        self.sink_proxy = SinkProxy(web_port, RELAY_REQUEST_TIMEOUT_SECONDS + 1)
        await self.sink_proxy.start()

        broker_port = free_port()
        self.broker = ManagedProcess(
            "broker",
            runledger_argv("broker", "--port", str(broker_port)),
            self._env(broker_id="soak-broker"),
            self.workdir / "broker.log",
            port=broker_port,
        )
        await self.broker.start()
        self.runner_proxy = TcpProxy(broker_port)
        await self.runner_proxy.start()

        self.relay = ManagedProcess(
            "relay",
            runledger_argv("relay"),
            self._env(
                sink_url=f"http://127.0.0.1:{self.sink_proxy.port}/api/runner/events",
                signing_secret=self.signing_secret,
                relay_request_timeout=str(RELAY_REQUEST_TIMEOUT_SECONDS),
                relay_lease_duration="10",
                relay_backoff_cap="5",
                relay_metrics_port="0",
            ),
            self.workdir / "relay.log",
        )
        await self.relay.start()

        for index in range(self.runner_count):
            await self._add_runner(index)

    async def _add_runner(self, index: int) -> None:
        assert self.pool is not None and self.runner_proxy is not None
        name = f"soak-{index:03d}"
        token = new_token()
        runner_id = await self.pool.fetchval(
            "INSERT INTO runners (name, token_hash) VALUES ($1, $2) RETURNING id",
            name,
            hash_token(token),
        )
        process = ManagedProcess(
            name,
            runledger_argv("runner"),
            self._env(
                token=token,
                broker_url=f"ws://127.0.0.1:{self.runner_proxy.port}",
                spool_path=str(self.workdir / f"{name}.sqlite3"),
                chunk_bytes=str(CHUNK_BYTES),
                reconnect_max="3",
                ping_interval="2",
                ping_timeout="4",
            ),
            self.workdir / f"{name}.log",
        )
        await process.start()
        self.runners.append(SoakRunner(name, runner_id, token, process))

    async def restart_postgres(self) -> None:
        """Restart the embedded server (fast shutdown), as a failover would."""
        # pg_ctl restart reuses the options the server was started with.
        await self._pg_ctl("restart", "-m", "fast")

    async def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        # The server runs as the data folder's owner (not root); so must pg_ctl.
        owner = pwd.getpwuid(self.pgdata.stat().st_uid).pw_name
        await asyncio.to_thread(
            subprocess.run,
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), "-w", *args],
            user=owner if os.geteuid() == 0 else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=True,
            timeout=90,
        )

    async def stop(self) -> None:
        """Stop every process, the proxies and Postgres (its data is kept)."""
        await asyncio.gather(*(runner.process.stop() for runner in self.runners))
        for process in (self.relay, self.broker, self.web):
            if process is not None:
                await process.stop()
        for proxy in (self.runner_proxy, self.sink_proxy):
            if proxy is not None:
                await proxy.stop()
        if self.pool is not None:
            await self.pool.close()
        await self._stop_postgres()

    async def _stop_postgres(self) -> None:
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            await self._pg_ctl("stop", "-m", "fast")
            return
        except (subprocess.SubprocessError, OSError) as error:
            log.warning("soak.pg_ctl_failed", error=str(error))

        # pg_ctl could not reach the folder: SIGINT is a fast shutdown too.
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmaster = int(pid_file.read_text().split()[0])
            os.kill(postmaster, signal.SIGINT)
