"""The whole stack in one event loop: broker, relay, web tier and one runner.

``runledger dev`` and the end-to-end tests compose the parts through
:class:`DevStack`, which also runs a command through them and checks the trip:
bytes and SHA-256 of each stream as the child wrote them against what Postgres
stored, and the delivery figures.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from broker.relay import Relay, RelaySettings
from broker.server import BrokerServer
from broker.settings import BrokerSettings
from core.commands import submit_command
from core.database import Queries, create_pool
from core.logging import get_logger
from core.service import Service
from core.tokens import hash_token, new_token
from runledger.log import queries as log_queries
from runledger.log import stored_events
from runner.daemon import Runner
from runner.settings import RunnerSettings
from web.server import WebServer
from web.settings import WebSettings

log = get_logger("dev")
queries = Queries(Path(__file__).parent / "sql" / "dev.sql")

STREAMS = ("stdout", "stderr")
FOLLOW_INTERVAL_SECONDS = 0.05
DELIVERY_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class DevOptions:
    """How ``runledger dev`` lays out the stack."""

    database_url: str
    host: str = "127.0.0.1"
    broker_port: int = 8765
    web_port: int = 8000
    state_dir: Path = Path(".runledger")
    runner_name: str = "local"


@dataclass(frozen=True)
class StreamCheck:
    """One stream's figures as the child wrote it and as Postgres stored it."""

    stream: str
    written_bytes: int
    written_sha256: str
    stored_bytes: int
    stored_sha256: str

    @property
    def matches(self) -> bool:
        return (self.written_bytes, self.written_sha256) == (
            self.stored_bytes,
            self.stored_sha256,
        )


@dataclass(frozen=True)
class CommandOutcome:
    """How a command run through the stack ended, and what reached where."""

    command_id: uuid.UUID
    status: str
    exit_code: int | None
    reason: str | None
    streams: list[StreamCheck]
    events_stored: int
    events_delivered: int
    events_pending: int
    seconds: float

    @property
    def verified(self) -> bool:
        return all(check.matches for check in self.streams)


@dataclass
class DevStack:
    """Broker, relay, web tier and one runner, composed in this event loop."""

    options: DevOptions
    signing_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    api_token: str = field(default_factory=lambda: new_token("rla_"))
    pool: asyncpg.Pool | None = None
    broker: BrokerServer | None = None
    web: WebServer | None = None
    relay: Relay | None = None
    runner: Runner | None = None
    runner_id: uuid.UUID | None = None
    _started: list[Service] = field(default_factory=list)

    @property
    def web_url(self) -> str:
        assert self.web is not None
        return f"http://{self.options.host}:{self.web.port}"

    @property
    def broker_url(self) -> str:
        assert self.broker is not None
        return f"ws://{self.options.host}:{self.broker.port}"

    async def start(self) -> None:
        """Start every part, in the order the path of an event needs them."""
        url = self.options.database_url
        self.options.state_dir.mkdir(parents=True, exist_ok=True)
        self.pool = await create_pool(url, max_size=4)

        # A fresh token on every start: the old one is no longer accepted.
        runner_token = new_token()
        self.runner_id = await self.pool.fetchval(
            queries.upsert_runner_token,
            self.options.runner_name,
            hash_token(runner_token),
        )

        self.broker = BrokerServer(
            BrokerSettings(host=self.options.host, port=self.options.broker_port),
            url,
        )
        await self._start(self.broker)
        self.web = WebServer(
            WebSettings(
                host=self.options.host,
                port=self.options.web_port,
                signing_secret=self.signing_secret,
                api_token=self.api_token,
            ),
            url,
        )
        await self._start(self.web)
        self.relay = Relay(
            RelaySettings(
                sink_url=f"{self.web_url}/api/runner/events",
                signing_secret=self.signing_secret,
            ),
            url,
        )
        await self._start(self.relay)
        self.runner = Runner(
            RunnerSettings(
                broker_url=self.broker_url,
                token=runner_token,
                # The runner's own default name, so `runledger runner --status`
                # finds this spool without being told where it is.
                spool_path=self.options.state_dir / "runner-spool.sqlite3",
            )
        )
        await self._start(self.runner)

    async def _start(self, service: Service) -> None:
        await service.start()
        self._started.append(service)

    async def stop(self) -> None:
        """Stop in reverse order, so every part drains into the next."""
        for service in reversed(self._started):
            try:
                await service.stop()
            except Exception as error:  # keep stopping the others
                log.warning(
                    "dev.stop_failed", service=type(service).__name__, error=str(error)
                )
        self._started.clear()
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def run_command(
        self,
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        echo: Callable[[str, bytes], None] | None = None,
    ) -> CommandOutcome:
        """Run ``argv`` on the local runner; follow its log; check the trip."""
        assert self.pool is not None and self.runner_id is not None
        started = time.monotonic()
        async with self.pool.acquire() as connection:
            command_id = await submit_command(
                connection, self.runner_id, argv, cwd=cwd, env=env
            )
            exit_payload = await self._follow(connection, command_id, echo)
            figures = await self._wait_for_delivery(connection, command_id)
            stored = {
                record["stream"]: record
                for record in await connection.fetch(
                    log_queries.stored_streams, command_id
                )
            }

        written = exit_payload.get("streams") or {}
        checks = [
            StreamCheck(
                stream=stream,
                written_bytes=int((written.get(stream) or {}).get("bytes", 0)),
                written_sha256=str(
                    (written.get(stream) or {}).get("sha256", _EMPTY_SHA256)
                ),
                stored_bytes=int(stored[stream]["bytes"]) if stream in stored else 0,
                stored_sha256=(
                    stored[stream]["sha256"] if stream in stored else _EMPTY_SHA256
                ),
            )
            for stream in STREAMS
        ]
        return CommandOutcome(
            command_id=command_id,
            status=str(exit_payload.get("status")),
            exit_code=exit_payload.get("exit_code"),
            reason=exit_payload.get("reason"),
            streams=checks,
            events_stored=figures["stored"],
            events_delivered=figures["delivered"],
            events_pending=figures["pending"],
            seconds=time.monotonic() - started,
        )

    async def _follow(
        self,
        connection: asyncpg.Connection,
        command_id: uuid.UUID,
        echo: Callable[[str, bytes], None] | None,
    ) -> dict[str, Any]:
        # Read the log as it is stored, in order, until the final event.
        after = 0
        while True:
            async for event in stored_events(connection, command_id, after):
                after = event["sequence"]
                if event["kind"] == "output" and echo is not None:
                    echo(event["stream"], event["data"])
                if event["kind"] == "exit":
                    payload: dict[str, Any] = _as_dict(event["payload"])
                    return payload
            await asyncio.sleep(FOLLOW_INTERVAL_SECONDS)

    async def _wait_for_delivery(
        self, connection: asyncpg.Connection, command_id: uuid.UUID
    ) -> dict[str, int]:
        # The relay runs beside us; give it time to reach the web tier.
        deadline = time.monotonic() + DELIVERY_TIMEOUT_SECONDS
        while True:
            record = await connection.fetchrow(log_queries.delivery_figures, command_id)
            figures = {
                "stored": int(record["stored"]),
                "delivered": int(record["delivered"]),
                "pending": int(record["pending"]),
            }
            if figures["pending"] == 0 or time.monotonic() > deadline:
                return figures
            await asyncio.sleep(FOLLOW_INTERVAL_SECONDS)


_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _as_dict(payload: Any) -> dict[str, Any]:
    if isinstance(payload, str):
        loaded: dict[str, Any] = json.loads(payload)
        return loaded
    return dict(payload or {})
