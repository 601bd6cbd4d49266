"""The JSON API: reading logs, listing, control, and the relay's ingest.

Read endpoints are open (the server binds to loopback by default). Control
endpoints need the API token as a Bearer header. Ingest needs a delivery
signed with the shared secret, within the timestamp tolerance.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Literal

import asyncpg
import msgspec
from litestar import Request, Router, get, post
from litestar.exceptions import (
    ClientException,
    NotAuthorizedException,
    NotFoundException,
    ServiceUnavailableException,
    ValidationException,
)
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from core import signing
from core.commands import (
    EVENTS_CHANNEL,
    UnknownRunnerError,
    request_cancel,
    runner_id_by_name,
    submit_command,
)
from core.errors import AuthenticationError, ProtocolError
from core.logging import get_logger
from web.auth import require_bearer
from web.ingest import UnknownCommandDelivery, apply_delivery, decode_delivery
from web.queries import web_queries as queries
from web.reader import UnknownCommandError, json_object, read_page_waiting
from web.runtime import Runtime, runtime_of
from web.schemas import (
    CancelResult,
    CommandDetail,
    CommandSummary,
    EventsPage,
    IngestResult,
    ReplayResult,
    RunnerOut,
    StreamVerification,
    SubmitCommand,
    Submitted,
)

log = get_logger("web")


NO_CSRF = {"exclude_from_csrf": True}

# Events read per query while streaming a raw log.
RAW_PAGE_EVENTS = 1000


# -- reading ---------------------------------------------------------------


@get("/commands/{command_id:uuid}/events", summary="A gap-aware page of the log")
async def command_events(
    request: Request,
    command_id: FromPath[uuid.UUID],
    after: Annotated[
        int, QueryParameter(ge=0, description="last sequence already read")
    ] = 0,
    limit: Annotated[
        int, QueryParameter(ge=1, description="most events to return")
    ] = 500,
    wait: Annotated[
        float,
        QueryParameter(ge=0, description="seconds to wait for new events (long poll)"),
    ] = 0.0,
) -> EventsPage:
    """Events after ``after`` in sequence order, stopping at the first missing one."""
    runtime = runtime_of(request)
    limit = min(limit, runtime.settings.page_limit_max)
    wait = min(wait, runtime.settings.long_poll_max_seconds)

    runtime.metrics.long_polls.inc()
    try:
        page = await read_page_waiting(
            runtime.pool, runtime.notifier, command_id, after, limit, wait
        )
    except UnknownCommandError:
        raise NotFoundException(f"no command {command_id}") from None
    finally:
        runtime.metrics.long_polls.dec()
    runtime.metrics.pages_read.inc()
    return page


@get(
    "/commands/{command_id:uuid}/log",
    summary="The raw output bytes",
    media_type="application/octet-stream",
)
async def command_log(
    request: Request,
    command_id: FromPath[uuid.UUID],
    stream: Annotated[
        Literal["stdout", "stderr"] | None,
        QueryParameter(description="one stream only; both, interleaved, when omitted"),
    ] = None,
) -> Stream:
    """The stored output, byte for byte, in sequence order.

    The body ends before the first missing sequence, exactly where a reader of
    the events API would wait; that API tells which sequences are missing.
    """
    runtime = runtime_of(request)
    if await runtime.pool.fetchval(queries.command_state, command_id) is None:
        raise NotFoundException(f"no command {command_id}")
    return Stream(
        _output_chunks(runtime.pool, command_id, stream),
        media_type="application/octet-stream",
    )


async def _output_chunks(
    pool: asyncpg.Pool, command_id: uuid.UUID, stream: str | None
) -> AsyncIterator[bytes]:
    # Page by cursor, like a reader of the events API, and stop at the first
    # missing sequence: a download never silently skips a hole.
    after = 0
    while True:
        rows = await pool.fetch(
            queries.events_after, command_id, after, RAW_PAGE_EVENTS
        )
        for row in rows:
            if row["sequence"] != after + 1:
                return
            after = row["sequence"]
            if row["kind"] == "output" and stream in (None, row["stream"]):
                yield bytes(row["data"])
        if len(rows) < RAW_PAGE_EVENTS:
            return


@get("/commands", summary="Commands, newest first")
async def list_commands(
    request: Request,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    before: Annotated[
        datetime | None,
        QueryParameter(description="only commands created before this time"),
    ] = None,
) -> list[CommandSummary]:
    """The newest commands with their status, exit code, duration and runner."""
    runtime = runtime_of(request)
    rows = await runtime.pool.fetch(queries.list_commands, before, limit)
    return [command_summary(row) for row in rows]


@get("/commands/{command_id:uuid}", summary="One command and its verification")
async def command_detail(
    request: Request, command_id: FromPath[uuid.UUID]
) -> CommandDetail:
    """A command's summary, relay state and end-to-end verification."""
    detail = await load_command_detail(runtime_of(request).pool, command_id)
    if detail is None:
        raise NotFoundException(f"no command {command_id}")
    return detail


@get("/runners", summary="Runners and what they do")
async def list_runners(request: Request) -> list[RunnerOut]:
    """Every runner, whether it is connected, last seen, and its current command."""
    rows = await runtime_of(request).pool.fetch(queries.list_runners)
    return [runner_out(row) for row in rows]


# -- control ---------------------------------------------------------------


@post("/commands", status_code=201, opt=NO_CSRF, summary="Submit a command")
async def create_command(request: Request, data: JSONBody[SubmitCommand]) -> Submitted:
    """Queue ``argv`` on a runner (by name or id); needs the API token."""
    runtime = runtime_of(request)
    require_bearer(request, runtime.control_token_hash)
    command_id = await submit(runtime, data)
    return Submitted(
        id=command_id,
        url=f"/commands/{command_id}",
        events_url=f"/api/commands/{command_id}/events?after=0",
    )


async def submit(runtime: Runtime, data: JSONBody[SubmitCommand]) -> uuid.UUID:
    """Store a command from a request; raises ClientException on bad input."""
    if not data.argv or not data.argv[0]:
        raise ValidationException("argv must name a program to run")
    async with runtime.pool.acquire() as connection:
        try:
            if data.runner_id is not None:
                runner_id = data.runner_id
                exists = await connection.fetchval(
                    "SELECT true FROM runners WHERE id = $1 AND revoked_at IS NULL",
                    runner_id,
                )
                if not exists:
                    raise UnknownRunnerError(f"no runner with id {runner_id}")
            elif data.runner:
                runner_id = await runner_id_by_name(connection, data.runner)
            else:
                runner_id = await _only_runner(connection)
            command_id = await submit_command(
                connection, runner_id, data.argv, data.cwd, data.env
            )
        except UnknownRunnerError as error:
            raise ClientException(str(error), status_code=422) from None
    log.info("web.command_submitted", command_id=str(command_id))
    return command_id


async def _only_runner(connection: asyncpg.Connection) -> uuid.UUID:
    # With one runner there is nothing to choose; with several, say so.
    runner_ids = await connection.fetch(
        "SELECT id FROM runners WHERE revoked_at IS NULL LIMIT 2"
    )
    if len(runner_ids) != 1:
        raise ValidationException(
            "name the runner with runner or runner_id "
            f"({'several runners exist' if runner_ids else 'no runner exists'})"
        )
    runner_id: uuid.UUID = runner_ids[0]["id"]
    return runner_id


@post(
    "/commands/{command_id:uuid}/cancel",
    status_code=200,
    opt=NO_CSRF,
    summary="Cancel a command",
)
async def cancel_command(
    request: Request, command_id: FromPath[uuid.UUID]
) -> CancelResult:
    """Ask the runner to stop a command; needs the API token."""
    runtime = runtime_of(request)
    require_bearer(request, runtime.control_token_hash)
    return await cancel(runtime, command_id)


async def cancel(runtime: Runtime, command_id: uuid.UUID) -> CancelResult:
    """Request a cancel; 404 for an unknown command."""
    async with runtime.pool.acquire() as connection:
        if await connection.fetchval(queries.command_state, command_id) is None:
            raise NotFoundException(f"no command {command_id}")
        requested = await request_cancel(connection, command_id)
    log.info("web.cancel_requested", command_id=str(command_id), accepted=requested)
    return CancelResult(id=command_id, cancel_requested=requested)


@post(
    "/commands/{command_id:uuid}/replay",
    status_code=200,
    opt=NO_CSRF,
    summary="Replay a dead delivery",
)
async def replay_command(
    request: Request, command_id: FromPath[uuid.UUID]
) -> ReplayResult:
    """Set a dead command's delivery going again; needs the API token."""
    runtime = runtime_of(request)
    require_bearer(request, runtime.control_token_hash)
    return await replay(runtime, command_id)


async def replay(runtime: Runtime, command_id: uuid.UUID) -> ReplayResult:
    """Make a dead delivery active again and wake the relay."""
    async with runtime.pool.acquire() as connection, connection.transaction():
        replayed = await connection.fetchval(queries.replay_dead, command_id)
        if replayed:
            await connection.execute(
                "SELECT pg_notify($1, $2)", EVENTS_CHANNEL, str(command_id)
            )
    log.info(
        "web.delivery_replayed", command_id=str(command_id), replayed=bool(replayed)
    )
    return ReplayResult(command_id=command_id, replayed=bool(replayed))


# -- ingest ----------------------------------------------------------------


@post("/runner/events", status_code=200, opt=NO_CSRF, summary="The relay's sink")
async def ingest_events(request: Request) -> IngestResult:
    """Verify a signed delivery and apply it to the command summary once."""
    runtime = runtime_of(request)
    metrics = runtime.metrics
    body = await request.body()

    try:
        delivery_id = signing.verify(
            runtime.settings.signing_key(),
            request.headers,
            body,
            tolerance_seconds=runtime.settings.timestamp_tolerance_seconds,
        )
    except AuthenticationError as error:
        metrics.deliveries_refused.labels("signature").inc()
        log.warning("web.delivery_refused", reason=str(error))
        raise NotAuthorizedException(str(error)) from None

    try:
        delivery = decode_delivery(body, delivery_id)
        async with runtime.pool.acquire() as connection:
            applied = await apply_delivery(connection, delivery)
    except UnknownCommandDelivery as error:
        metrics.deliveries_refused.labels(error.code).inc()
        raise ClientException(error.reason, status_code=422) from None
    except ProtocolError as error:
        metrics.deliveries_refused.labels(error.code).inc()
        log.warning(
            "web.delivery_refused", delivery_id=delivery_id, reason=error.reason
        )
        raise ClientException(error.reason) from None
    except (OSError, asyncpg.PostgresError) as error:
        # Retryable: the relay tries again with the same delivery id.
        log.warning("web.delivery_failed", delivery_id=delivery_id, error=str(error))
        raise ServiceUnavailableException("the database is not available") from None

    if applied.duplicate:
        metrics.deliveries_duplicate.inc()
    else:
        metrics.deliveries_applied.inc()
        metrics.events_applied.inc(applied.events)
    if applied.verification_matched is not None:
        outcome = "matched" if applied.verification_matched else "mismatched"
        metrics.verifications.labels(outcome).inc()
        if not applied.verification_matched:
            log.warning(
                "web.verification_mismatch", command_id=str(delivery.command_id)
            )
    log.debug(
        "web.delivery_applied",
        delivery_id=delivery_id,
        events=applied.events,
        duplicate=applied.duplicate,
    )
    return IngestResult(
        delivery_id=delivery_id,
        command_id=delivery.command_id,
        applied=applied.events,
        duplicate=applied.duplicate,
    )


# -- shapes ----------------------------------------------------------------


def _duration(row: asyncpg.Record) -> float | None:
    started = row["started_at"]
    if started is None:
        return None
    finished = row["finished_at"] or datetime.now(UTC)
    return max((finished - started).total_seconds(), 0.0)


def command_summary(row: asyncpg.Record) -> CommandSummary:
    """A list row as the API shows it."""
    return CommandSummary(
        id=row["id"],
        runner_id=row["runner_id"],
        runner_name=row["runner_name"],
        argv=json.loads(row["argv"]),
        status=row["status"],
        exit_code=row["exit_code"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        last_activity_at=row["last_activity_at"],
        duration_seconds=_duration(row),
        verification_matched=row["verification_matched"],
    )


async def load_command_detail(
    pool: asyncpg.Pool, command_id: uuid.UUID
) -> CommandDetail | None:
    """One command in full, or None when unknown."""
    row = await pool.fetchrow(queries.command_detail, command_id)
    if row is None:
        return None
    verification_document = json_object(row["verification"])
    verification = (
        msgspec.convert(verification_document, dict[str, StreamVerification])
        if verification_document is not None
        else None
    )
    return CommandDetail(
        id=row["id"],
        runner_id=row["runner_id"],
        runner_name=row["runner_name"],
        argv=json.loads(row["argv"]),
        cwd=row["cwd"],
        env=json.loads(row["env"]),
        status=row["status"],
        exit_code=row["exit_code"],
        created_at=row["created_at"],
        dispatched_at=row["dispatched_at"],
        cancel_requested_at=row["cancel_requested_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        last_activity_at=row["last_activity_at"],
        duration_seconds=_duration(row),
        applied_through=row["applied_through"],
        delivery_state=row["delivery_state"],
        delivered_through=row["delivered_through"],
        delivery_error=row["last_error"],
        verification=verification,
        verification_matched=row["verification_matched"],
    )


def runner_out(row: asyncpg.Record) -> RunnerOut:
    """A runner row as the API shows it."""
    argv = row["current_command_argv"]
    return RunnerOut(
        id=row["id"],
        name=row["name"],
        connected=bool(row["connected"]) and row["revoked_at"] is None,
        revoked=row["revoked_at"] is not None,
        created_at=row["created_at"],
        last_seen_at=row["last_seen_at"],
        connected_at=row["connected_at"],
        disconnected_at=row["disconnected_at"],
        current_command_id=row["current_command_id"],
        current_command_argv=json.loads(argv) if argv is not None else None,
        current_command_status=row["current_command_status"],
    )


api_router = Router(
    path="/api",
    route_handlers=[
        command_events,
        command_log,
        list_commands,
        command_detail,
        list_runners,
        create_command,
        cancel_command,
        replay_command,
        ingest_events,
    ],
    tags=["runledger"],
)
