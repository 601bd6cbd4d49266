"""The pages in Debian's chromium, driven by Playwright, with stored data.

Events are inserted with SQL and the exit is delivered through the signed
ingest endpoint, as the relay would. Screenshots of every page are saved
under ``test-output/screenshots/``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from core import signing
from core.delivery import DeliveredEvent, DeliveryBatch, delivery_id_for, encode
from tests.conftest import create_command
from tests.web.browser import SCREENSHOTS, shoot, sign_in, skip_without_chromium
from tests.web.conftest import (
    SIGNING_SECRET,
    StoredCommand,
    exit_payload,
    insert_event,
)
from web.server import WebServer

pytestmark = [pytest.mark.browser, skip_without_chromium]


async def _deliver(server: WebServer, events: list[DeliveredEvent]) -> None:
    command_id = events[0].command_id
    batch = DeliveryBatch(
        delivery_id_for(command_id, events[0].sequence, events[-1].sequence),
        command_id,
        events,
    )
    body = encode(batch)
    headers = signing.sign(SIGNING_SECRET.encode(), batch.delivery_id, body)
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post(
            "/api/runner/events", content=body, headers=headers
        )
    assert response.status_code == 200, response.text


HOSTILE_LINE = (
    b"<script>window.__pwned = 1</script><img src=x onerror=window.__pwned=2>\n"
)


async def test_command_page_follows_a_live_log_safely(
    browser_page: Any,
    web_server: WebServer,
    pool: asyncpg.Pool,
    stored_command: StoredCommand,
) -> None:
    """The live log grows as events are stored, stays inert, and ends verified."""
    page = browser_page
    command_id = stored_command.command_id
    await pool.execute(
        "UPDATE runners SET connected_at = now(), last_seen_at = now() WHERE id = $1",
        stored_command.runner_id,
    )
    await insert_event(
        pool, command_id, 1, kind="status", payload={"status": "running", "pid": 4242}
    )
    await _deliver(
        web_server,
        [
            DeliveredEvent(
                uuid.uuid4(),
                command_id,
                1,
                "status",
                payload={"status": "running", "pid": 4242},
            )
        ],
    )

    stdout_chunks = [
        b"\x1b[1mCompiling\x1b[0m runledger v0.1.0\n",
        HOSTILE_LINE,
        b"\x1b[32m   ok\x1b[0m  core/wire.py  \x1b[38;5;208m256-colour\x1b[0m "
        b"\x1b[38;2;120;200;255mtruecolour\x1b[0m\n",
        b"progress  10%\rprogress  60%\rprogress 100%\n",
        b"nul:\x00 bell:\x07 invalid:\xff\xfe end\n",
    ]
    stderr_chunks = [b"\x1b[33mwarning:\x1b[0m unused variable `x`\n"]
    sequence = 1
    for chunk in stdout_chunks[:2]:
        sequence += 1
        await insert_event(pool, command_id, sequence, stream="stdout", data=chunk)

    await page.goto(f"{web_server.url}/commands/{command_id}")
    log = page.locator("#log")
    await page.wait_for_function(
        "document.getElementById('log').textContent.includes('window.__pwned = 1')"
    )

    # The log grows while the page is open.
    for chunk in stdout_chunks[2:]:
        sequence += 1
        await insert_event(pool, command_id, sequence, stream="stdout", data=chunk)
        await asyncio.sleep(0.2)
    sequence += 1
    await insert_event(
        pool, command_id, sequence, stream="stderr", data=stderr_chunks[0]
    )
    for number in range(1, 41):
        sequence += 1
        line = f"test_case_{number:03d} ... \x1b[32mPASSED\x1b[0m\n".encode()
        await insert_event(pool, command_id, sequence, stream="stdout", data=line)
    await page.wait_for_function(
        "document.getElementById('log').textContent.includes('test_case_040')"
    )

    text = await log.text_content()
    assert "<script>window.__pwned = 1</script>" in text
    assert await page.evaluate("window.__pwned === undefined")
    assert await page.locator("#log script, #log img").count() == 0
    assert "progress 100%" in text and "progress  10%" not in text
    assert "nul:^@ bell:^G" in text  # control characters in caret notation
    assert await page.locator("#log .line.stderr").count() == 1
    assert await page.locator("#log .f2").count() >= 40  # green "PASSED"
    assert "Compiling" in await page.locator("#log .b").first.text_content()

    # The end: exit stored, delivered, and the verification appears.
    stdout = b"".join(stdout_chunks) + b"".join(
        f"test_case_{n:03d} ... \x1b[32mPASSED\x1b[0m\n".encode() for n in range(1, 41)
    )
    payload = exit_payload(stdout, stderr_chunks[0], "succeeded", 0)
    sequence += 1
    await insert_event(pool, command_id, sequence, kind="exit", payload=payload)
    await _deliver(
        web_server,
        [DeliveredEvent(uuid.uuid4(), command_id, sequence, "exit", payload=payload)],
    )
    await page.wait_for_selector("#verification:not([hidden]) .badge-verified")
    await page.wait_for_function(
        "document.getElementById('log-state').textContent.startsWith('complete')"
    )
    assert await page.locator("#status-badge .badge-succeeded").count() == 1
    await shoot(page, "command-succeeded")
    await log.evaluate("element => { element.scrollTop = 0; }")
    await log.screenshot(path=str(SCREENSHOTS / "command-log-colours.png"))


async def test_gap_is_shown_as_missing_range(
    browser_page: Any,
    web_server: WebServer,
    pool: asyncpg.Pool,
    stored_command: StoredCommand,
) -> None:
    """A recorded gap appears in the log as "missing 41-57" and the log continues."""
    command_id = stored_command.command_id
    for sequence in range(1, 41):
        await insert_event(
            pool, command_id, sequence, data=f"line {sequence}\n".encode(), notify=False
        )
    for sequence in range(58, 61):
        await insert_event(
            pool, command_id, sequence, data=f"line {sequence}\n".encode(), notify=False
        )
    await pool.execute(
        "INSERT INTO gaps (command_id, first_missing, last_missing, skipped_at)"
        " VALUES ($1, 41, 57, now())",
        command_id,
    )
    await browser_page.goto(f"{web_server.url}/commands/{command_id}")
    await browser_page.wait_for_function(
        "document.getElementById('log').textContent.includes('line 60')"
    )
    gap = browser_page.locator("#log .line.gap")
    assert "missing 41-57" in await gap.text_content()
    await shoot(browser_page, "command-gap")


async def test_large_log_renders_with_long_lines_cut(
    browser_page: Any,
    web_server: WebServer,
    pool: asyncpg.Pool,
    stored_command: StoredCommand,
) -> None:
    """20,000 lines and a 3 MB line without newline render; the long line is cut."""
    command_id = stored_command.command_id
    sequence = 0
    for chunk in range(40):
        sequence += 1
        data = b"".join(
            f"\x1b[32mline {chunk * 500 + number}\x1b[0m compiled\n".encode()
            for number in range(500)
        )
        await insert_event(pool, command_id, sequence, data=data, notify=False)
    await insert_event(pool, command_id, sequence + 1, data=b"y" * 3_000_000)
    await insert_event(pool, command_id, sequence + 2, data=b"\nthe end\n")

    await browser_page.goto(f"{web_server.url}/commands/{command_id}")
    await browser_page.wait_for_function(
        "document.getElementById('log').textContent.includes('the end')",
        timeout=120_000,
    )
    assert await browser_page.locator("#log .line.stdout").count() == 20_002
    cut = browser_page.locator("#log .cut")
    assert "2,980,000 more characters" in await cut.text_content()
    text = await browser_page.locator("#log").text_content()
    assert len(text) < 1_000_000
    await shoot(browser_page, "command-large-log")


async def test_pages_render_and_forms_work(
    browser_page: Any,
    web_server: WebServer,
    pool: asyncpg.Pool,
    stored_command: StoredCommand,
) -> None:
    """Runners, commands and delivery health render; sign-in, cancel and replay work."""
    page = browser_page
    await _seed_history(pool, stored_command)

    await page.goto(f"{web_server.url}/runners")
    assert await page.locator("td.strong", has_text="laptop").count() == 1
    await shoot(page, "runners")

    await page.goto(f"{web_server.url}/signin")
    await shoot(page, "signin")
    await sign_in(page, web_server)
    assert await page.locator("#run-form").count() == 1
    await shoot(page, "commands")

    # Cancel from the command page.
    await page.goto(f"{web_server.url}/commands/{stored_command.command_id}")
    await page.click("#cancel-form button")
    await page.wait_for_selector("#cancel-form button:disabled")
    assert await pool.fetchval(
        "SELECT cancel_requested_at IS NOT NULL FROM commands WHERE id = $1",
        stored_command.command_id,
    )

    # Replay a dead letter from the delivery-health page.
    await page.goto(f"{web_server.url}/delivery")
    assert await page.locator("svg.chart").count() == 3
    await shoot(page, "delivery-health")
    dead_id = await pool.fetchval(
        "SELECT command_id FROM command_delivery WHERE state = 'dead'"
    )
    await page.click(f"form[action='/delivery/{dead_id}/replay'] button")
    await page.wait_for_url(f"{web_server.url}/delivery")
    assert (
        await pool.fetchval(
            "SELECT state FROM command_delivery WHERE command_id = $1", dead_id
        )
        == "active"
    )


async def _seed_history(pool: asyncpg.Pool, stored_command: StoredCommand) -> None:
    """Commands in every state, a second runner, an hour of traffic, a dead letter."""
    await pool.execute(
        "UPDATE runners SET connected_at = now() - interval '2 hours',"
        " last_seen_at = now() WHERE id = $1",
        stored_command.runner_id,
    )
    await pool.execute(
        "UPDATE commands SET status = 'running',"
        " started_at = now() - interval '95 seconds'"
        " WHERE id = $1",
        stored_command.command_id,
    )
    other = await pool.fetchval(
        "INSERT INTO runners"
        " (name, token_hash, last_seen_at, connected_at, disconnected_at)"
        " VALUES ('ci-arm64', 'h', now() - interval '3 hours',"
        " now() - interval '5 hours',"
        " now() - interval '3 hours') RETURNING id"
    )
    finished = [
        (["pytest", "-q", "tests/"], "succeeded", 0, 42.5, True),
        (["cargo", "build", "--release"], "failed", 101, 312.0, True),
        (["npm", "run", "e2e"], "cancelled", None, 12.0, None),
        (["./deploy.sh", "staging"], "lost", None, 3.2, None),
    ]
    for index, (argv, status, exit_code, seconds, matched) in enumerate(finished):
        command_id = await create_command(
            pool, other if index % 2 else stored_command.runner_id, argv
        )
        await pool.execute(
            "UPDATE commands SET status = $2, exit_code = $3,"
            " started_at = now() - make_interval(mins => $5)"
            " - make_interval(secs => $4),"
            " finished_at = now() - make_interval(mins => $5),"
            " verification_matched = $6"
            " WHERE id = $1",
            command_id,
            status,
            exit_code,
            seconds,
            10 * (index + 1),
            matched,
        )
    dead = await create_command(pool, other, ["make", "docs"])
    await pool.execute(
        "UPDATE command_delivery SET state = 'dead', attempts = 8, last_status = 500,"
        " last_error = 'sink answered 500 Internal Server Error',"
        " first_failure_at = now() - interval '20 minutes' WHERE command_id = $1",
        dead,
    )

    # An hour of traffic: events stored and delivered, with a burst and some lag.
    busy = await create_command(pool, stored_command.runner_id, ["make", "-j8", "all"])
    rows = []
    deliveries = []
    sequence = 0
    for minute in range(60, 0, -1):
        count = 30 + (minute % 7) * 12 + (120 if 20 <= minute <= 25 else 0)
        first = sequence + 1
        for _ in range(count):
            sequence += 1
            rows.append((busy, sequence, minute))
        lag = 2 if not 20 <= minute <= 25 else 40
        deliveries.append(
            (busy, f"{busy}:{first}-{sequence}", first, sequence, count, minute, lag)
        )
    await pool.executemany(
        "INSERT INTO events (command_id, sequence, id, kind, stream, data, stored_at)"
        " VALUES ($1, $2, gen_random_uuid(), 'output', 'stdout', '\\x2e',"
        " now() - make_interval(mins => $3))",
        rows,
    )
    await pool.executemany(
        "INSERT INTO deliveries"
        " (command_id, delivery_id, first_sequence, last_sequence,"
        " event_count, delivered_at)"
        " VALUES ($1, $2, $3, $4, $5,"
        " now() - make_interval(mins => $6) + make_interval(secs => $7))",
        deliveries[:-3],
    )
    last_delivered = deliveries[-4][3]
    await pool.execute(
        "UPDATE command_delivery SET delivered_through = $2 WHERE command_id = $1",
        busy,
        last_delivered,
    )


def test_screenshot_folder_is_under_test_output() -> None:
    """Screenshots land in test-output/screenshots at the repository root."""
    assert SCREENSHOTS.parts[-2:] == ("test-output", "screenshots")
    assert os.path.isdir(SCREENSHOTS.parent.parent / "web")
