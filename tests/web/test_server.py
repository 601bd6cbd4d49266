"""The web service: port 0, health, metrics, and a bounded stop."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.web.conftest import StoredCommand
from web.server import WebServer, WebStartError
from web.settings import WebSettings


async def test_starts_on_a_free_port_and_answers_health(web_server: WebServer) -> None:
    """Port 0 binds a free port on loopback; /healthz reports the database."""
    assert web_server.port > 0
    async with httpx.AsyncClient(base_url=web_server.url) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": True, "listening": True}


async def test_metrics_are_prometheus_text(
    client: httpx.AsyncClient, stored_command: StoredCommand
) -> None:
    """/metrics exposes counters and the database gauges."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert "runledger_web_deliveries_applied_total 0.0" in response.text
    assert 'runledger_commands{status="queued"} 1.0' in response.text
    assert "runledger_forwarding_queue_events 0.0" in response.text


async def test_metrics_content_type_names_its_charset_once(
    client: httpx.AsyncClient,
) -> None:
    """/metrics has Prometheus's text content type with a single charset."""
    response = await client.get("/metrics")
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain; version=0.0.4")
    assert content_type.count("charset") == 1, content_type


async def test_stop_ends_open_long_polls_quickly(
    web_settings: WebSettings, database_url: str, stored_command: StoredCommand
) -> None:
    """Stopping with a long poll open returns within the graceful shutdown bound."""
    server = WebServer(web_settings, database_url)
    await server.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        poll = asyncio.create_task(
            client.get(f"/api/commands/{stored_command.command_id}/events?wait=10")
        )
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await server.stop()
        elapsed = time.monotonic() - started
        response = await poll
    assert response.status_code == 200
    assert elapsed < 5


async def test_unreachable_database_fails_start_clearly(
    web_settings: WebSettings,
) -> None:
    """A database that cannot be reached makes start() raise, naming the cause."""
    server = WebServer(web_settings, "postgresql://nobody@127.0.0.1:9/nothing")
    with pytest.raises(WebStartError, match="cannot connect to Postgres"):
        await server.start()


async def test_two_servers_in_one_loop(
    web_settings: WebSettings, database_url: str
) -> None:
    """Two web tiers run side by side in one event loop on different ports."""
    first = WebServer(web_settings, database_url)
    second = WebServer(web_settings, database_url)
    await first.start()
    await second.start()
    try:
        assert first.port != second.port
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{second.url}/healthz")).status_code == 200
    finally:
        await second.stop()
        await first.stop()
