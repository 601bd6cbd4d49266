"""Pages for people: commands, one command's live log, runners, delivery health.

Pages are rendered on the server with Jinja (autoescaped). Log output never
goes through a template: the command page's script reads the events API and
builds DOM text nodes, so nothing in a log can run in the page. A strict
Content-Security-Policy (scripts from this origin only) backs that up.
Forms post with Litestar's CSRF token and need a signed-in person.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from litestar import Request, Router, get, post
from litestar.datastructures import Cookie, ResponseHeader
from litestar.exceptions import (
    ClientException,
    HTTPException,
    NotFoundException,
    PermissionDeniedException,
)
from litestar.params import FromPath, FromQuery, URLEncodedBody
from litestar.response import Redirect, Template

from core.tables import FINAL_STATUSES
from web.api import (
    cancel,
    command_summary,
    load_command_detail,
    replay,
    runner_out,
    submit,
)
from web.auth import (
    CONTROL_OFF,
    SESSION_COOKIE,
    session_cookie_value,
    signed_in,
    token_allowed,
)
from web.delivery_health import delivery_health
from web.queries import web_queries as queries
from web.runtime import Runtime, runtime_of
from web.schemas import SubmitCommand

FormData = URLEncodedBody[dict[str, str]]

COMMANDS_PER_PAGE = 100

SECURITY_HEADERS = [
    ResponseHeader(
        name="content-security-policy",
        value=(
            "default-src 'self'; script-src 'self'; style-src 'self'; "
            "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'"
        ),
    ),
    ResponseHeader(name="x-content-type-options", value="nosniff"),
    ResponseHeader(name="referrer-policy", value="same-origin"),
]


def _context(request: Request, section: str, **values: Any) -> dict[str, Any]:
    runtime = runtime_of(request)
    return {
        "section": section,
        "control_on": runtime.control_token_hash is not None,
        "signed_in": signed_in(request, runtime.cookie_key),
        **values,
    }


def _require_signed_in(request: Request) -> Runtime:
    runtime = runtime_of(request)
    if runtime.control_token_hash is None:
        raise PermissionDeniedException(CONTROL_OFF)
    if not signed_in(request, runtime.cookie_key):
        raise PermissionDeniedException("sign in with the API token first")
    return runtime


@get("/", include_in_schema=False)
async def home() -> Redirect:
    """The commands list is the front page."""
    return Redirect(path="/commands")


@get("/commands", include_in_schema=False)
async def commands_page(
    request: Request, before: FromQuery[datetime | None] = None
) -> Template:
    """Recent commands (older ones page by page), and a form to run a new one."""
    runtime = runtime_of(request)
    async with runtime.pool.acquire() as connection:
        rows = await connection.fetch(queries.list_commands, before, COMMANDS_PER_PAGE)
        runner_rows = await connection.fetch(queries.list_runners)
    commands = [command_summary(row) for row in rows]
    older = (
        commands[-1].created_at.isoformat()
        if len(commands) == COMMANDS_PER_PAGE
        else None
    )
    return Template(
        template_name="commands.html",
        context=_context(
            request,
            "commands",
            commands=commands,
            runners=[runner_out(row) for row in runner_rows],
            older=older,
            paged=before is not None,
        ),
    )


@post("/commands", include_in_schema=False)
async def submit_from_page(request: Request, data: FormData) -> Redirect:
    """Submit the form's command and open its page."""
    runtime = _require_signed_in(request)
    try:
        argv = shlex.split(data.get("argv", ""))
    except ValueError as error:
        raise ClientException(f"the command line does not parse: {error}") from None
    env: dict[str, str] = {}
    for line in data.get("env", "").splitlines():
        if not line.strip():
            continue
        name, separator, value = line.partition("=")
        if not separator or not name.strip():
            raise ClientException(f"environment lines are NAME=value, got {line!r}")
        env[name.strip()] = value
    command_id = await submit(
        runtime,
        SubmitCommand(
            argv=argv,
            runner=data.get("runner") or None,
            cwd=data.get("cwd") or None,
            env=env,
        ),
    )
    return Redirect(path=f"/commands/{command_id}")


@get("/commands/{command_id:uuid}", include_in_schema=False)
async def command_page(request: Request, command_id: FromPath[uuid.UUID]) -> Template:
    """One command: summary, live log, verification, cancel."""
    detail = await load_command_detail(runtime_of(request).pool, command_id)
    if detail is None:
        raise NotFoundException(f"no command {command_id}")
    return Template(
        template_name="command.html",
        context=_context(
            request,
            "commands",
            command=detail,
            finished=detail.status in FINAL_STATUSES,
        ),
    )


@post("/commands/{command_id:uuid}/cancel", include_in_schema=False)
async def cancel_from_page(
    request: Request, command_id: FromPath[uuid.UUID]
) -> Redirect:
    """Request a cancel and go back to the command."""
    runtime = _require_signed_in(request)
    await cancel(runtime, command_id)
    return Redirect(path=f"/commands/{command_id}")


@get("/runners", include_in_schema=False)
async def runners_page(request: Request) -> Template:
    """Every runner, connected or not, and what it runs."""
    rows = await runtime_of(request).pool.fetch(queries.list_runners)
    return Template(
        template_name="runners.html",
        context=_context(request, "runners", runners=[runner_out(row) for row in rows]),
    )


@get("/delivery", include_in_schema=False)
async def delivery_page(request: Request) -> Template:
    """Charts of the last hour and the dead-letter list."""
    health = await delivery_health(runtime_of(request).pool)
    return Template(
        template_name="delivery.html",
        context=_context(request, "delivery", health=health),
    )


@post("/delivery/{command_id:uuid}/replay", include_in_schema=False)
async def replay_from_page(
    request: Request, command_id: FromPath[uuid.UUID]
) -> Redirect:
    """Replay a dead delivery and go back to the list."""
    runtime = _require_signed_in(request)
    await replay(runtime, command_id)
    return Redirect(path="/delivery")


@get("/signin", include_in_schema=False)
async def signin_page(request: Request, next: FromQuery[str] = "/commands") -> Template:
    """The sign-in form."""
    return Template(
        template_name="signin.html",
        context=_context(request, "", next=_safe_next(next), failed=False),
    )


@post("/signin", include_in_schema=False)
async def signin(request: Request, data: FormData) -> Redirect | Template:
    """Check the API token and set the sign-in cookie."""
    runtime = runtime_of(request)
    if runtime.control_token_hash is None:
        raise PermissionDeniedException(CONTROL_OFF)
    destination = _safe_next(data.get("next", "/commands"))
    if not token_allowed(data.get("token", "").strip(), runtime.control_token_hash):
        return Template(
            template_name="signin.html",
            context=_context(request, "", next=destination, failed=True),
            status_code=401,
        )
    lifetime = runtime.settings.session_hours * 3600
    return Redirect(
        path=destination,
        cookies=[
            Cookie(
                key=SESSION_COOKIE,
                value=session_cookie_value(runtime.cookie_key, lifetime),
                max_age=lifetime,
                httponly=True,
                samesite="lax",
                path="/",
            )
        ],
    )


@post("/signout", include_in_schema=False)
async def signout() -> Redirect:
    """Forget the sign-in cookie."""
    return Redirect(
        path="/commands",
        cookies=[Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/")],
    )


def _safe_next(path: str) -> str:
    # Only local paths: an open redirect would let a link sign people in elsewhere.
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/commands"
    return path


# -- template filters ------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """``850ms``, ``12.4s``, ``3m 05s``, ``2h 07m``; an em dash for unknown."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_time(value: datetime | None) -> str:
    """A UTC time to the second, or an em dash."""
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_ago(value: datetime | None) -> str:
    """How long ago, roughly: ``just now``, ``4m ago``, ``3h ago``, ``2d ago``."""
    if value is None:
        return "never"
    seconds = (datetime.now(UTC) - value).total_seconds()
    if seconds < 10:
        return "just now"
    if seconds < 3600:
        return (
            f"{int(seconds // 60) or 1}m ago"
            if seconds >= 60
            else f"{int(seconds)}s ago"
        )
    if seconds < 86400:
        return f"{int(seconds // 3600)}h ago"
    return f"{int(seconds // 86400)}d ago"


def format_argv(argv: list[str] | None) -> str:
    """A command line as a shell would show it."""
    return shlex.join(argv) if argv else ""


def short_id(value: uuid.UUID | str | None) -> str:
    """The first 8 hex digits of an id, as lists show it."""
    return str(value)[:8] if value is not None else ""


def template_filters() -> dict[str, Callable[..., str]]:
    """The filters the templates use."""
    return {
        "duration": format_duration,
        "when": format_time,
        "ago": format_ago,
        "argv": format_argv,
        "short_id": short_id,
    }


def _error_page(request: Request, error: HTTPException) -> Template:
    return Template(
        template_name="error.html",
        context=_context(request, "", status=error.status_code, detail=error.detail),
        status_code=error.status_code,
    )


page_router = Router(
    path="/",
    route_handlers=[
        home,
        commands_page,
        submit_from_page,
        command_page,
        cancel_from_page,
        runners_page,
        delivery_page,
        replay_from_page,
        signin_page,
        signin,
        signout,
    ],
    response_headers=SECURITY_HEADERS,
    exception_handlers={HTTPException: _error_page},
)

page_handlers = [page_router]
