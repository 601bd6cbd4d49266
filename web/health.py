"""Health and metrics: ``/healthz`` for probes, ``/metrics`` for Prometheus."""

from __future__ import annotations

import asyncpg
import msgspec
from litestar import Request, get
from litestar.exceptions import ServiceUnavailableException
from litestar.response import Response

from web.runtime import runtime_of


class Health(msgspec.Struct):
    """Whether the web tier can serve: database reachable, listener up."""

    status: str
    database: bool
    listening: bool


@get("/healthz", summary="Liveness and readiness", tags=["operations"])
async def healthz(request: Request) -> Response[Health]:
    """200 when Postgres answers; 503 otherwise (the listener is reported too)."""
    runtime = runtime_of(request)
    database = False
    try:
        database = await runtime.pool.fetchval("SELECT true") is True
    except (
        OSError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        ServiceUnavailableException,  # the pool is not open (yet or any more)
    ):
        database = False
    health = Health(
        status="ok" if database else "unavailable",
        database=database,
        listening=runtime.notifier.listening,
    )
    return Response(health, status_code=200 if database else 503)


@get(
    "/metrics",
    summary="Prometheus metrics",
    media_type="text/plain; version=0.0.4",
    tags=["operations"],
)
async def metrics(request: Request) -> bytes:
    """Counters of this process and queue gauges read from Postgres."""
    runtime = runtime_of(request)
    return await runtime.metrics.render(runtime.pool)


health_handlers = [healthz, metrics]
