"""The pages: escaping, security headers, sign-in, and CSRF-protected forms."""

from __future__ import annotations

import re
import uuid

import asyncpg
import httpx
import pytest

from tests.conftest import create_command
from tests.web.conftest import API_TOKEN, StoredCommand
from web.pages import COMMANDS_PER_PAGE, _safe_next, format_ago, format_duration


def _csrf_token(html: str) -> str:
    match = re.search(r'name="_csrf_token" value="([^"]+)"', html)
    assert match, "page has no CSRF field"
    return match.group(1)


async def _signed_in(client: httpx.AsyncClient) -> str:
    """Sign in through the form; return a CSRF token for further forms."""
    token = _csrf_token((await client.get("/signin")).text)
    response = await client.post(
        "/signin", data={"token": API_TOKEN, "next": "/commands", "_csrf_token": token}
    )
    assert response.status_code in (301, 302, 303), response.text
    return _csrf_token((await client.get("/commands")).text)


async def test_pages_render_with_security_headers(
    client: httpx.AsyncClient, stored_command: StoredCommand
) -> None:
    """Every page answers 200 with a strict Content-Security-Policy."""
    for path in (
        "/commands",
        "/runners",
        "/delivery",
        "/signin",
        f"/commands/{stored_command.command_id}",
    ):
        response = await client.get(path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"


async def test_unknown_command_page_is_a_404_page(client: httpx.AsyncClient) -> None:
    """An unknown command answers a readable 404 page, not JSON."""
    response = await client.get(f"/commands/{uuid.uuid4()}")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")
    assert "Back to the commands" in response.text


async def test_commands_page_pages_to_older_commands(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """With more commands than a page holds, an Older link shows the rest."""
    await pool.executemany(
        "INSERT INTO commands (runner_id, argv, created_at)"
        " VALUES ($1, $2::jsonb, now() - make_interval(secs => $3))",
        [
            (stored_command.runner_id, f'["job", "{n}"]', n + 1)
            for n in range(COMMANDS_PER_PAGE + 5)
        ],
    )
    first = await client.get("/commands")
    match = re.search(r'href="(/commands\?before=[^"]+)"', first.text)
    assert match, "no link to older commands"
    second = await client.get(match.group(1).replace("&amp;", "&"))
    assert second.status_code == 200
    assert f"job {COMMANDS_PER_PAGE + 4}" in second.text
    assert "make test" not in second.text


async def test_argv_is_escaped_in_pages(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """A command line holding markup is shown as text, never as markup."""
    command_id = await create_command(
        pool, stored_command.runner_id, ["echo", "<script>alert(1)</script>"]
    )
    for path in ("/commands", f"/commands/{command_id}"):
        html = (await client.get(path)).text
        assert "<script>alert(1)</script>" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


async def test_form_without_csrf_token_is_refused(
    client: httpx.AsyncClient, stored_command: StoredCommand
) -> None:
    """A form post without the CSRF token is refused before anything runs."""
    await _signed_in(client)
    response = await client.post(
        "/commands", data={"runner": "laptop", "argv": "rm -rf /"}
    )
    assert response.status_code == 403


async def test_command_page_offers_sign_in_to_cancel(
    client: httpx.AsyncClient, stored_command: StoredCommand
) -> None:
    """Before sign-in the command page links to sign-in instead of a cancel form."""
    html = (await client.get(f"/commands/{stored_command.command_id}")).text
    assert f'href="/signin?next=/commands/{stored_command.command_id}"' in html
    assert 'id="cancel-form"' not in html


async def test_forms_need_sign_in(
    client: httpx.AsyncClient, stored_command: StoredCommand
) -> None:
    """With a valid CSRF token but no sign-in, cancel is refused."""
    token = _csrf_token((await client.get("/signin")).text)
    response = await client.post(
        f"/commands/{stored_command.command_id}/cancel", data={"_csrf_token": token}
    )
    assert response.status_code == 403
    assert "sign in" in response.text


async def test_wrong_token_does_not_sign_in(client: httpx.AsyncClient) -> None:
    """A wrong API token on the sign-in form is answered 401 and sets no session."""
    token = _csrf_token((await client.get("/signin")).text)
    response = await client.post(
        "/signin", data={"token": "rla_wrong", "next": "/", "_csrf_token": token}
    )
    assert response.status_code == 401
    assert "runledger_session" not in response.cookies


async def test_signed_in_form_submits_a_command(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """The run form stores the command (argv split like a shell) and opens its page."""
    token = await _signed_in(client)
    response = await client.post(
        "/commands",
        data={
            "runner": "laptop",
            "argv": "sh -c 'echo \"hello world\"'",
            "cwd": "/tmp",
            "env": "GREETING=hi\n",
            "_csrf_token": token,
        },
    )
    assert response.status_code in (301, 302, 303)
    command_id = uuid.UUID(response.headers["location"].rsplit("/", 1)[1])
    row = await pool.fetchrow(
        "SELECT argv, env, cwd FROM commands WHERE id = $1", command_id
    )
    assert row["argv"] == '["sh", "-c", "echo \\"hello world\\""]'
    assert row["env"] == '{"GREETING": "hi"}'
    assert row["cwd"] == "/tmp"


async def test_signed_in_cancel_form(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """The cancel button records the cancel request."""
    token = await _signed_in(client)
    response = await client.post(
        f"/commands/{stored_command.command_id}/cancel", data={"_csrf_token": token}
    )
    assert response.status_code in (301, 302, 303)
    assert await pool.fetchval(
        "SELECT cancel_requested_at IS NOT NULL FROM commands WHERE id = $1",
        stored_command.command_id,
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/commands/1", "/commands/1"),
        ("https://evil.example/", "/commands"),
        ("//evil.example/", "/commands"),
        ("/\\evil.example", "/commands"),
    ],
)
def test_sign_in_redirects_only_to_local_paths(given: str, expected: str) -> None:
    """After sign-in, only a local path is followed (no open redirect)."""
    assert _safe_next(given) == expected


def test_durations_read_naturally() -> None:
    """Durations are short and human."""
    assert [format_duration(s) for s in (None, 0.25, 12.44, 185, 7620)] == [
        "—",
        "250ms",
        "12.4s",
        "3m 05s",
        "2h 07m",
    ]
    assert format_ago(None) == "never"
