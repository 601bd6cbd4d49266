"""The JSON API: exact bytes, lists, details, and token-guarded control."""

from __future__ import annotations

import base64
import uuid

import asyncpg
import httpx

from tests.conftest import register_runner
from tests.web.conftest import API_TOKEN, StoredCommand, insert_event, store_run

HOSTILE = (
    b"<script>window.__pwned = 1</script>\n"
    b"\x1b[1;31mred\x1b[0m \x1b]0;title\x07 \x1b[2K\rprogress 50%\r"
    b"\x00\x07\xff\xfe invalid utf-8 & <b>bold</b>\n"
)

AUTH = {"authorization": f"Bearer {API_TOKEN}"}


async def test_hostile_log_is_returned_byte_exact(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """A log with <script>, escapes, NUL and bad UTF-8 comes back exact, as base64."""
    command_id = stored_command.command_id
    await insert_event(pool, command_id, 1, stream="stdout", data=HOSTILE)
    await insert_event(pool, command_id, 2, stream="stderr", data=HOSTILE[::-1])

    page = (await client.get(f"/api/commands/{command_id}/events")).json()
    first, second = page["events"]
    assert base64.b64decode(first["data"]) == HOSTILE
    assert first["stream"] == "stdout"
    assert base64.b64decode(second["data"]) == HOSTILE[::-1]
    assert second["stream"] == "stderr"
    assert first["text"] == HOSTILE.decode("utf-8", errors="replace")

    raw = await client.get(
        f"/api/commands/{command_id}/log", params={"stream": "stdout"}
    )
    assert raw.headers["content-type"].startswith("application/octet-stream")
    assert raw.content == HOSTILE


async def test_raw_log_keeps_sequence_order_per_stream(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """The raw log of each stream (and of both) is its chunks in sequence order."""
    command_id = stored_command.command_id
    chunks = [
        ("stdout", b"a1"),
        ("stderr", b"b1"),
        ("stdout", b"a2"),
        ("stderr", b"b2"),
    ]
    await store_run(pool, command_id, chunks)

    stdout = await client.get(f"/api/commands/{command_id}/log?stream=stdout")
    stderr = await client.get(f"/api/commands/{command_id}/log?stream=stderr")
    both = await client.get(f"/api/commands/{command_id}/log")
    assert (stdout.content, stderr.content, both.content) == (
        b"a1a2",
        b"b1b2",
        b"a1b1a2b2",
    )
    assert (
        await client.get(f"/api/commands/{command_id}/log?stream=other")
    ).status_code == 400


async def test_raw_log_stops_at_the_first_missing_sequence(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """A download ends before a hole instead of skipping it silently."""
    command_id = stored_command.command_id
    for sequence, data in ((1, b"one "), (2, b"two "), (4, b"four")):
        await insert_event(pool, command_id, sequence, data=data)
    raw = await client.get(f"/api/commands/{command_id}/log")
    assert raw.content == b"one two "


async def test_lists_show_commands_and_runners(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """GET /api/commands and /api/runners describe what is stored."""
    await pool.execute(
        "UPDATE runners SET connected_at = now(), last_seen_at = now() WHERE id = $1",
        stored_command.runner_id,
    )
    await pool.execute(
        "UPDATE commands SET status = 'running', started_at = now() WHERE id = $1",
        stored_command.command_id,
    )

    commands = (await client.get("/api/commands")).json()
    assert [command["id"] for command in commands] == [str(stored_command.command_id)]
    assert commands[0]["argv"] == ["make", "test"]
    assert commands[0]["runner_name"] == "laptop"
    assert commands[0]["duration_seconds"] >= 0

    runners = (await client.get("/api/runners")).json()
    assert runners[0]["name"] == "laptop"
    assert runners[0]["connected"] is True
    assert runners[0]["current_command_id"] == str(stored_command.command_id)


async def test_submit_needs_the_api_token(
    client: httpx.AsyncClient, stored_command: StoredCommand
) -> None:
    """POST /api/commands without the token is 401, with a wrong one 401 too."""
    body = {"runner": "laptop", "argv": ["true"]}
    assert (await client.post("/api/commands", json=body)).status_code == 401
    wrong = {"authorization": "Bearer rla_wrong"}
    assert (
        await client.post("/api/commands", json=body, headers=wrong)
    ).status_code == 401


async def test_submit_by_runner_name_stores_a_command(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """A submitted command is stored queued, with its relay state row."""
    body = {
        "runner": "laptop",
        "argv": ["echo", "hi"],
        "cwd": "/tmp",
        "env": {"A": "1"},
    }
    response = await client.post("/api/commands", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    command_id = uuid.UUID(response.json()["id"])

    row = await pool.fetchrow("SELECT * FROM commands WHERE id = $1", command_id)
    assert row["status"] == "queued"
    assert row["cwd"] == "/tmp"
    assert (
        await pool.fetchval(
            "SELECT state FROM command_delivery WHERE command_id = $1", command_id
        )
        == "active"
    )


async def test_submit_to_unknown_runner_is_422(
    client: httpx.AsyncClient, stored_command: StoredCommand
) -> None:
    """Naming a runner that does not exist is a client error that says so."""
    response = await client.post(
        "/api/commands", json={"runner": "nobody", "argv": ["true"]}, headers=AUTH
    )
    assert response.status_code == 422
    assert "nobody" in response.json()["detail"]


async def test_submit_without_a_runner_goes_to_the_only_one(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """With exactly one runner, a command that names none is given to it."""
    response = await client.post("/api/commands", json={"argv": ["true"]}, headers=AUTH)
    assert response.status_code == 201, response.text
    runner_name = await pool.fetchval(
        "SELECT r.name FROM commands c JOIN runners r ON r.id = c.runner_id "
        "WHERE c.id = $1",
        uuid.UUID(response.json()["id"]),
    )
    assert runner_name == "laptop"


async def test_submit_without_a_runner_among_several_says_to_name_one(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """With several runners, leaving the runner out is refused with the reason."""
    await register_runner(pool, "ci-box")
    response = await client.post("/api/commands", json={"argv": ["true"]}, headers=AUTH)
    assert response.status_code == 400
    assert "several runners exist" in response.text


async def test_cancel_marks_the_command(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """POST .../cancel with the token records the cancel request."""
    url = f"/api/commands/{stored_command.command_id}/cancel"
    assert (await client.post(url)).status_code == 401
    response = await client.post(url, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["cancel_requested"] is True
    assert await pool.fetchval(
        "SELECT cancel_requested_at IS NOT NULL FROM commands WHERE id = $1",
        stored_command.command_id,
    )


async def test_replay_revives_a_dead_delivery(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """Replaying sets the dead command active with no attempts and due now."""
    command_id = stored_command.command_id
    await pool.execute(
        "UPDATE command_delivery SET state = 'dead', attempts = 9,"
        " last_error = 'HTTP 500' WHERE command_id = $1",
        command_id,
    )
    response = await client.post(f"/api/commands/{command_id}/replay", headers=AUTH)
    assert response.json() == {"command_id": str(command_id), "replayed": True}
    row = await pool.fetchrow(
        "SELECT * FROM command_delivery WHERE command_id = $1", command_id
    )
    assert (row["state"], row["attempts"]) == ("active", 0)
    assert row["next_attempt_at"] is not None


async def test_openapi_documents_the_shapes(client: httpx.AsyncClient) -> None:
    """The OpenAPI document names the read API and its page shape."""
    schema = (await client.get("/schema/openapi.json")).json()
    assert "/api/commands/{command_id}/events" in schema["paths"]
    assert "EventsPage" in schema["components"]["schemas"]
    page = schema["components"]["schemas"]["EventsPage"]["properties"]
    assert {
        "next_after",
        "contiguous_through",
        "highest_stored",
        "gaps",
        "finished",
    } <= set(page)
