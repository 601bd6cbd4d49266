"""The whole path in a browser: a real runner, broker, relay and web tier.

A person signs in, runs a command from the page, watches its log grow to the
end with the final status and verification, then cancels a long command.
Everything runs in this event loop against this test's database.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.relay import Relay
from broker.relay_settings import RelaySettings
from broker.server import BrokerServer
from broker.settings import BrokerSettings
from runner.daemon import Runner
from runner.settings import RunnerSettings
from tests.conftest import register_runner
from tests.web.browser import SCREENSHOTS, shoot, sign_in, skip_without_chromium
from tests.web.conftest import SIGNING_SECRET
from web.server import WebServer
from web.settings import WebSettings

pytestmark = [pytest.mark.browser, pytest.mark.slow, skip_without_chromium]

BUILD_SCRIPT = """
import os, sys, time
print("\\x1b[1mbuilding\\x1b[0m <script>window.__pwned = 1</script>", flush=True)
for step in range(1, 41):
    # Half-way, wait for the test to have seen the log live on the page.
    while step == 21 and not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    print(f"\\x1b[32mok\\x1b[0m step {step:02d} of 40", flush=True)
    if step % 8 == 0:
        print(f"\\x1b[33mwarning\\x1b[0m: step {step}", file=sys.stderr, flush=True)
    time.sleep(0.1)
sys.stdout.buffer.write(b"raw bytes: \\x00\\xff\\xfe\\r\\ndone\\n")
"""

LONG_SCRIPT = """
import time
print("waiting for a cancel", flush=True)
time.sleep(300)
"""


@dataclass
class Stack:
    """The four services, where the web tier listens, and the scripts to run."""

    web: WebServer
    services: list[Any]
    build_script: Path
    long_script: Path
    seen_marker: Path


@pytest.fixture
async def stack(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> AsyncIterator[Stack]:
    """Broker, web tier, relay and a runner named ``laptop``, started in order."""
    runner = await register_runner(pool, "laptop")
    broker = BrokerServer(BrokerSettings(host="127.0.0.1", port=0), database_url)
    web = WebServer(
        WebSettings(
            port=0,
            signing_secret=SIGNING_SECRET,
            api_token="rla_test-api-token",
            graceful_shutdown_seconds=2.0,
        ),
        database_url,
    )
    started: list[Any] = []
    try:
        for service in (broker, web):
            await service.start()
            started.append(service)
        relay = Relay(
            RelaySettings(
                sink_url=f"{web.url}/api/runner/events",
                signing_secret=SIGNING_SECRET,
            ),
            database_url,
        )
        await relay.start()
        started.append(relay)
        daemon = Runner(
            RunnerSettings(
                broker_url=f"ws://127.0.0.1:{broker.port}",
                token=runner.token,
                spool_path=tmp_path / "spool.sqlite",
            )
        )
        await daemon.start()
        started.append(daemon)
        build_script = tmp_path / "build.py"
        build_script.write_text(BUILD_SCRIPT)
        long_script = tmp_path / "long.py"
        long_script.write_text(LONG_SCRIPT)
        yield Stack(web, started, build_script, long_script, tmp_path / "seen")
    finally:
        for service in reversed(started):
            await asyncio.wait_for(service.stop(), 30)


async def _text(page: Any, selector: str) -> str:
    return (await page.locator(selector).text_content()) or ""


async def _wait_for_text(page: Any, selector: str, needle: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while needle not in await _text(page, selector):
        assert time.monotonic() < deadline, f"{needle!r} not in {selector} in time"
        await asyncio.sleep(0.2)


async def _run_from_page(page: Any, web: WebServer, argv: list[str]) -> None:
    await page.goto(f"{web.url}/commands")
    await page.select_option("select[name=runner]", "laptop")
    await page.fill("input[name=argv]", shlex.join(argv))
    await page.click("#run-form button[type=submit]")
    await page.wait_for_url(f"{web.url}/commands/*")


async def test_run_watch_and_cancel_from_the_pages(
    browser_page: Any, stack: Stack, pool: asyncpg.Pool
) -> None:
    """A command runs from the page to a verified end; a long one is cancelled."""
    page = browser_page
    web = stack.web
    await page.goto(f"{web.url}/runners")
    await _wait_for_runner_connected(page, web)
    await sign_in(page, web)

    # Run a build and watch its log grow while it runs.
    await _run_from_page(
        page, web, [sys.executable, str(stack.build_script), str(stack.seen_marker)]
    )
    await _wait_for_text(page, "#log", "step 20", 60)
    early = await _text(page, "#log")
    assert "step 21" not in early
    await shoot(page, "flow-command-running")
    stack.seen_marker.touch()

    await _wait_for_text(page, "#log", "done", 60)
    await page.wait_for_selector("#status-badge .badge-succeeded", timeout=60_000)
    await page.wait_for_selector(
        "#verification:not([hidden]) .badge-verified", timeout=60_000
    )
    final = await _text(page, "#log")
    assert len(final) > len(early)
    assert "<script>window.__pwned = 1</script>" in final
    assert await page.evaluate("window.__pwned === undefined")
    for step in range(1, 41):
        assert final.count(f"step {step:02d} of 40") == 1
    assert await page.locator("#log .line.stderr").count() == 5
    assert "raw bytes: ^@" in final
    assert await _text(page, "#fact-exit") == "0"
    await shoot(page, "flow-command-verified")

    # A long command, cancelled from its page.
    await _run_from_page(page, web, [sys.executable, str(stack.long_script)])
    await _wait_for_text(page, "#log", "waiting for a cancel", 60)
    await page.click("#cancel-form button")
    await page.wait_for_selector("#status-badge .badge-cancelled", timeout=60_000)
    await _wait_for_text(page, "#log", "cancelled", 30)
    await shoot(page, "flow-command-cancelled")

    statuses = await pool.fetch("SELECT status FROM commands ORDER BY created_at")
    assert [row["status"] for row in statuses] == ["succeeded", "cancelled"]

    for name, path in (
        ("flow-commands", "/commands"),
        ("flow-runners", "/runners"),
        ("flow-delivery-health", "/delivery"),
    ):
        await page.goto(f"{web.url}{path}")
        await shoot(page, name)
    assert (SCREENSHOTS / "flow-command-verified.png").exists()


async def _wait_for_runner_connected(page: Any, web: WebServer) -> None:
    deadline = time.monotonic() + 30
    while True:
        await page.goto(f"{web.url}/runners")
        if await page.locator(".badge-connected").count():
            return
        assert time.monotonic() < deadline, "the runner did not connect"
        await asyncio.sleep(0.5)
