"""The Litestar application and the service that serves it under uvicorn.

``create_app`` builds the app: the JSON API under ``/api``, the pages, the
static files, ``/healthz`` and ``/metrics``. The asyncpg pool opens on
startup and closes on shutdown; a dedicated connection LISTENs for committed
events to wake long polls. ``WebServer`` runs uvicorn inside the current
event loop, so ``runledger dev`` can compose it with the other services.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from litestar import Litestar
from litestar.config.csrf import CSRFConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.template import TemplateConfig
from litestar.types import Scope

from core.database import create_pool, redact_url
from core.errors import RunledgerError
from core.logging import get_logger
from web.api import api_router
from web.health import health_handlers
from web.metrics import WebMetrics
from web.notifier import EventNotifier
from web.pages import page_handlers, template_filters
from web.runtime import Runtime, runtime_from_state
from web.settings import WebSettings

log = get_logger("web")

HERE = Path(__file__).parent


class WebStartError(RunledgerError):
    """The web tier could not start (port taken, database unreachable, ...)."""


def create_app(settings: WebSettings, database_url: str) -> Litestar:
    """The web tier's Litestar app; raises ConfigurationError for bad settings."""
    settings.validate()
    runtime = Runtime(
        settings=settings,
        database_url=database_url,
        notifier=EventNotifier(database_url),
        metrics=WebMetrics(),
        control_token_hash=settings.control_token_hash(),
        cookie_key=settings.cookie_key(),
    )

    async def open_database(app: Litestar) -> None:
        state = runtime_from_state(app.state)
        try:
            state.pool_holder.append(await create_pool(state.database_url))
            await state.notifier.start()
        except BaseException as error:
            state.startup_error = error
            raise
        log.info("web.database_ready", database=redact_url(state.database_url))

    async def close_database(app: Litestar) -> None:
        state = runtime_from_state(app.state)
        await state.notifier.close()
        while state.pool_holder:
            pool = state.pool_holder.pop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), timeout=5)

    async def log_unexpected(error: Exception, scope: Scope) -> None:
        # Client errors are answers, not faults; only the rest is logged.
        if isinstance(error, HTTPException) and error.status_code < 500:
            return
        log.error(
            "web.request_failed",
            path=scope.get("path"),
            error=f"{type(error).__name__}: {error}",
            exc_info=error,
        )

    def configure_templates(engine: JinjaTemplateEngine) -> None:
        engine.engine.filters.update(template_filters())

    return Litestar(
        route_handlers=[
            api_router,
            *health_handlers,
            *page_handlers,
            create_static_files_router(path="/static", directories=[HERE / "static"]),
        ],
        on_startup=[open_database],
        on_shutdown=[close_database],
        state=State({"runtime": runtime}),
        template_config=TemplateConfig(
            directory=HERE / "templates",
            engine=JinjaTemplateEngine,
            engine_callback=configure_templates,
        ),
        csrf_config=CSRFConfig(
            secret=runtime.cookie_key,
            cookie_name="runledger_csrf",
            cookie_samesite="strict",
            cookie_httponly=False,
        ),
        openapi_config=OpenAPIConfig(
            title="runledger",
            version="0.1.0",
            description=(
                "Build runners' logs, byte-exact, read by cursor from Postgres."
            ),
            path="/schema",
        ),
        request_max_body_size=settings.ingest_max_body_bytes,
        logging_config=None,
        after_exception=[log_unexpected],
    )


class _LoopServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: the caller owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebServer:
    """The web tier as a service: ``await start()``, ``.port``, ``await stop()``."""

    def __init__(self, settings: WebSettings, database_url: str) -> None:
        self.settings = settings
        self.database_url = database_url
        self.app = create_app(settings, database_url)
        self._server: _LoopServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port; only valid after ``start()``."""
        if self._server is None or not self._server.servers:
            raise RuntimeError("the web server is not started")
        port: int = self._server.servers[0].sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """The base URL people and the relay use."""
        return f"http://{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Serve; return once listening. Raises WebStartError when it cannot."""
        config = uvicorn.Config(
            self.app,
            host=self.settings.host,
            port=self.settings.port,
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(
                int(self.settings.graceful_shutdown_seconds), 1
            ),
        )
        self._server = _LoopServer(config)
        self._task = asyncio.create_task(self._serve(), name="runledger-web")

        # Wait for either "listening" or the serve task ending early.
        while not self._server.started:
            if self._task.done():
                error = self._task.exception()
                runtime = runtime_from_state(self.app.state)
                cause = runtime.startup_error or error
                raise WebStartError(
                    f"the web tier could not start on "
                    f"{self.settings.host}:{self.settings.port}: {cause or 'see log'}"
                ) from cause
            await asyncio.sleep(0.02)
        log.info("web.listening", url=self.url)

    async def _serve(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve()
        except SystemExit as error:
            # uvicorn exits the process on bind or lifespan failure; here that
            # must become an error of this service, not of the whole loop.
            raise WebStartError(f"uvicorn stopped with status {error.code}") from None

    async def stop(self) -> None:
        """Stop serving within the graceful shutdown time (plus a little)."""
        if self._server is None or self._task is None:
            return
        # Long polls would hold the graceful shutdown open; release them first.
        runtime_from_state(self.app.state).notifier.wake_all()
        await runtime_from_state(self.app.state).notifier.close()
        self._server.should_exit = True
        try:
            await asyncio.wait_for(
                asyncio.shield(self._task), self.settings.graceful_shutdown_seconds + 5
            )
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebStartError):
                await self._task
        except WebStartError:
            pass
        log.info("web.stopped")
