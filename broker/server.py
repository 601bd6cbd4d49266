"""The broker service: runners' WebSocket server, ingest, dispatch, metrics.

The opening handshake does the checks that need no WebSocket: plain
``GET /metrics`` and ``GET /healthz`` are answered there, and every other
request must carry ``Authorization: Bearer <runner token>``, checked before
the upgrade. An accepted connection raises the runner's connection epoch,
which fences off its older connections here and on every other broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import ssl
import uuid
import weakref
from collections import defaultdict
from typing import Any

import asyncpg
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from broker import metrics
from broker.dispatch import CommandListener
from broker.ingest import IngestWriter, queries
from broker.session import FaultHook, RunnerIdentity, RunnerSession
from broker.settings import BrokerSettings
from core import wire
from core.database import create_pool, redact_url
from core.logging import get_logger
from core.service import Service
from core.settings import load_settings
from core.tokens import hash_token, token_matches

log = get_logger("broker")

BEARER_PREFIX = "bearer "


class BrokerServer:
    """The broker: ``await start()`` binds (``.port``), ``await stop()`` ends it."""

    def __init__(
        self,
        settings: BrokerSettings,
        database_url: str,
        *,
        relay_settings: Any = None,
    ) -> None:
        """``relay_settings`` (a RelaySettings) applies when ``run_relay`` is set;
        without it the relay reads its settings from the environment."""
        settings.validate()
        self.settings = settings
        self.database_url = database_url
        self.limits = wire.Limits(
            max_frame_bytes=settings.max_frame_bytes,
            max_batch_events=settings.max_batch_events,
            max_event_bytes=settings.max_event_bytes,
        )
        self.fault_hook = FaultHook(settings.fault_crash_before_acknowledge)
        self.port: int = settings.port
        self._pool: asyncpg.Pool | None = None
        self._writer: IngestWriter | None = None
        self._listener: CommandListener | None = None
        self._server: Server | None = None
        self._relay: Service | None = None
        self._relay_settings = relay_settings
        self._sessions: dict[uuid.UUID, set[RunnerSession]] = defaultdict(set)
        # Set by the handshake, read by the handler; weak, so a handshake that
        # fails after authentication leaves nothing behind.
        self._identities: weakref.WeakKeyDictionary[
            ServerConnection, RunnerIdentity
        ] = weakref.WeakKeyDictionary()
        self._background: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None

    @property
    def sessions(self) -> list[RunnerSession]:
        """Every open runner session on this broker."""
        return [session for group in self._sessions.values() for session in group]

    @property
    def url(self) -> str:
        """``ws://`` or ``wss://`` address runners connect to."""
        scheme = "wss" if self.settings.tls else "ws"
        return f"{scheme}://{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Connect to Postgres, start the writer and listener, then bind."""
        settings = self.settings
        self._pool = await create_pool(
            self.database_url, min_size=1, max_size=settings.database_pool_size
        )
        self._writer = IngestWriter(self._pool, settings)
        await self._writer.start()
        self._listener = CommandListener(
            self.database_url, self._wake_runner, self._wake_all_runners
        )
        await self._listener.start()

        self._server = await serve(
            self._handle_connection,
            settings.host,
            settings.port,
            process_request=self._process_request,
            max_size=settings.max_frame_bytes_hard,
            ping_interval=settings.ping_interval,
            compression=None,
            ssl=self._ssl_context(),
        )
        sockets = list(self._server.sockets)
        self.port = sockets[0].getsockname()[1]

        self._heartbeat = asyncio.create_task(self._mark_runners_seen())
        if settings.run_retention:
            from core.retention import RetentionSettings, run_retention_loop

            self._retention = asyncio.create_task(
                run_retention_loop(self._pool, load_settings(RetentionSettings))
            )

        if settings.run_relay:
            self._relay = _make_relay(self.database_url, self._relay_settings)
            await self._relay.start()

        log.info(
            "broker.listening",
            url=self.url,
            database=redact_url(self.database_url),
            relay=settings.run_relay,
        )

    async def stop(self) -> None:
        """Close connections, commit what is queued, release Postgres."""
        timeout = self.settings.stop_timeout
        for task in (self._heartbeat, self._retention):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._heartbeat = self._retention = None
        if self._relay is not None:
            await self._relay.stop()
            self._relay = None
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), timeout)
            except TimeoutError:
                log.warning("broker.stop_timeout", sessions=len(self.sessions))
            self._server = None
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._writer is not None:
            await self._writer.stop(timeout)
            self._writer = None
        if self._pool is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pool.close(), timeout)
            self._pool = None
        log.info("broker.stopped")

    async def _mark_runners_seen(self) -> None:
        """Keep last_seen_at of connected runners fresh, for the runners page."""
        while True:
            await asyncio.sleep(self.settings.seen_interval)
            sessions = self.sessions
            if not sessions or self._pool is None:
                continue
            try:
                await self._pool.execute(
                    queries.mark_runners_seen,
                    [session.runner_id for session in sessions],
                    [session.connection_epoch for session in sessions],
                )
            except (OSError, asyncpg.PostgresError) as error:
                # A missed beat only makes a runner look idle a little longer.
                log.warning("broker.mark_seen_failed", error=str(error))

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.settings.tls_cert is None or self.settings.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        return context

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Answer /metrics and /healthz; authenticate everything else."""
        path = request.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = metrics.render()
            return _response(http.HTTPStatus.OK, body, content_type)
        if path == "/healthz":
            if self._writer is not None and self._writer.alive:
                return _response(http.HTTPStatus.OK, b"ok\n")
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, b"writer stopped\n")

        runner = await self._authenticate(request.headers)
        if isinstance(runner, Response):
            return runner

        open_sessions = len(self._sessions.get(runner.id, ()))
        if open_sessions >= self.settings.max_connections_per_runner:
            metrics.CONNECTIONS_REFUSED.labels("too_many_connections").inc()
            return _response(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                (
                    f"runner {runner.name} already has {open_sessions} connections "
                    "open on this broker, the limit "
                    f"(max_connections_per_runner={self.settings.max_connections_per_runner})\n"
                ).encode(),
            )
        self._identities[connection] = runner
        return None

    async def _authenticate(self, headers: Headers) -> RunnerIdentity | Response:
        header = headers.get("Authorization", "")
        if not header.lower().startswith(BEARER_PREFIX):
            metrics.CONNECTIONS_REFUSED.labels("no_token").inc()
            return _unauthorised(
                "send the runner token as 'Authorization: Bearer <token>'"
            )
        token = header[len(BEARER_PREFIX) :].strip()

        assert self._pool is not None
        try:
            row = await self._pool.fetchrow(
                queries.find_runner_by_token_hash, hash_token(token)
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
            log.warning("broker.authentication_unavailable", error=str(error))
            return _response(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                b"the broker cannot reach its database; retry later\n",
            )

        # The lookup is by hash; the comparison itself runs in constant time.
        if row is None or not token_matches(token, row["token_hash"]):
            metrics.CONNECTIONS_REFUSED.labels("bad_token").inc()
            log.info("broker.authentication_failed")
            return _unauthorised("the runner token is not known")
        if row["revoked_at"] is not None:
            metrics.CONNECTIONS_REFUSED.labels("revoked").inc()
            log.info("broker.authentication_failed", runner=row["name"], revoked=True)
            return _unauthorised("the runner token was revoked")
        return RunnerIdentity(row["id"], row["name"])

    async def _handle_connection(self, connection: ServerConnection) -> None:
        runner = self._identities.pop(connection, None)
        if runner is None:
            return
        assert self._pool is not None and self._writer is not None

        epoch = await self._pool.fetchval(
            queries.open_connection, runner.id, self.settings.name
        )
        if epoch is None:
            await connection.close(1008, "the runner token was revoked")
            return

        session = RunnerSession(
            connection,
            runner,
            epoch,
            settings=self.settings,
            limits=self.limits,
            writer=self._writer,
            pool=self._pool,
            fault_hook=self.fault_hook,
        )
        older = list(self._sessions.get(runner.id, ()))
        self._sessions[runner.id].add(session)
        metrics.CONNECTED_RUNNERS.inc()
        log.info(
            "broker.runner_connected",
            runner_id=str(runner.id),
            runner=runner.name,
            epoch=epoch,
        )
        try:
            for stale in older:
                task = asyncio.create_task(stale.fence())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            await session.run()
        finally:
            metrics.CONNECTED_RUNNERS.dec()
            group = self._sessions.get(runner.id)
            if group is not None:
                group.discard(session)
                if not group:
                    del self._sessions[runner.id]
            await self._record_disconnection(runner, epoch)
            log.info(
                "broker.runner_disconnected",
                runner_id=str(runner.id),
                runner=runner.name,
                epoch=epoch,
            )

    async def _record_disconnection(self, runner: RunnerIdentity, epoch: int) -> None:
        assert self._pool is not None
        try:
            await asyncio.wait_for(
                self._pool.execute(queries.close_connection, runner.id, epoch), 5.0
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            log.warning("broker.disconnect_not_recorded", runner_id=str(runner.id))

    def _wake_runner(self, runner_id: uuid.UUID) -> None:
        for session in self._sessions.get(runner_id, ()):
            session.request_dispatch()

    def _wake_all_runners(self) -> None:
        for session in self.sessions:
            session.request_dispatch()


def _response(
    status: http.HTTPStatus,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
) -> Response:
    headers = Headers(
        [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    )
    return Response(status.value, status.phrase, headers, body)


def _unauthorised(reason: str) -> Response:
    response = _response(http.HTTPStatus.UNAUTHORIZED, f"{reason}\n".encode())
    response.headers["WWW-Authenticate"] = 'Bearer realm="runledger"'
    return response


def _make_relay(database_url: str, relay_settings: Any) -> Service:
    """The outbox relay, imported only when this process is to run it."""
    from broker.relay import Relay
    from broker.relay_settings import RelaySettings

    if relay_settings is None:
        relay_settings = load_settings(RelaySettings)
    return Relay(relay_settings, database_url)
