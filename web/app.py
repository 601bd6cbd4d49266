"""The Litestar application of the web tier.

``create_app`` builds the app: the JSON API under ``/api``, the pages, the
static files, ``/healthz`` and ``/metrics``. The asyncpg pool opens on
startup and closes on shutdown; a dedicated connection LISTENs for committed
events to wake long polls. :mod:`web.server` serves it under uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

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
            state.database_pool = await create_pool(state.database_url)
            await state.notifier.start()
        except BaseException as error:
            # Shutdown hooks do not run after a failed startup: clean up here.
            state.startup_error = error
            if state.database_pool is not None:
                state.database_pool.terminate()
                state.database_pool = None
            raise
        log.info("web.database_ready", database=redact_url(state.database_url))

    async def close_database(app: Litestar) -> None:
        state = runtime_from_state(app.state)
        await state.notifier.close()
        pool, state.database_pool = state.database_pool, None
        if pool is not None:
            # A pool whose connections hang is abandoned rather than waited on.
            with contextlib.suppress(TimeoutError):
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
