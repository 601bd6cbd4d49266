"""What the request handlers share: settings, the pool, the notifier, metrics."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from litestar import Request
from litestar.datastructures import State
from litestar.exceptions import ServiceUnavailableException

from web.metrics import WebMetrics
from web.notifier import EventNotifier
from web.settings import WebSettings


@dataclass
class Runtime:
    """One web tier's state; created by ``create_app``, filled on startup."""

    settings: WebSettings
    database_url: str
    notifier: EventNotifier
    metrics: WebMetrics
    control_token_hash: str | None
    cookie_key: str
    database_pool: asyncpg.Pool | None = None
    startup_error: BaseException | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        """The connection pool; 503 before startup or after shutdown."""
        if self.database_pool is None:
            raise ServiceUnavailableException("the database pool is not open")
        return self.database_pool


def runtime_of(request: Request) -> Runtime:
    """The Runtime of the app that serves ``request``."""
    return runtime_from_state(request.app.state)


def runtime_from_state(state: State) -> Runtime:
    """The Runtime stored in an app's state."""
    runtime: Runtime = state["runtime"]
    return runtime
