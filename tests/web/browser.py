"""Driving Debian's chromium with Playwright: launch options, helpers, screenshots.

Playwright never downloads a browser here: it launches /usr/bin/chromium.
Tests that need it are skipped, with the reason, when it is not installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.web.conftest import API_TOKEN
from web.server import WebServer

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

skip_without_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed at /usr/bin/chromium "
    "(apt-get install -y chromium)",
)


async def open_browser_page() -> AsyncIterator[Any]:
    """A fresh chromium page, 1400x900, with the pages' CSP bypassed.

    Bypassing the Content-Security-Policy lets the test evaluate its own
    checks, and proves the log view is inert by construction, not only
    because the policy forbids inline scripts.
    """
    playwright_api = pytest.importorskip("playwright.async_api")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(
                viewport={"width": 1400, "height": 900}, bypass_csp=True
            )
            page = await context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            await browser.close()


async def sign_in(page: Any, server: WebServer) -> None:
    """Sign in on the pages with the test API token."""
    await page.goto(f"{server.url}/signin")
    await page.fill("input[name=token]", API_TOKEN)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{server.url}/commands")


async def shoot(page: Any, name: str) -> None:
    """Save a full-page screenshot as test-output/screenshots/NAME.png."""
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
