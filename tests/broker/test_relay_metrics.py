"""The relay's metrics: Prometheus names, the old JSON summary, the endpoint."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
from prometheus_client import REGISTRY

from broker.relay_metrics import MetricsServer
from tests.broker.relay_harness import (
    Answer,
    new_command,
    running_relay,
    running_sink,
    store_events,
    wait_until,
)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of a metric in the default registry (0 if unseen)."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_the_endpoint_serves_prometheus_text_and_the_json_summary() -> None:
    """/metrics is Prometheus text, /metrics.json the summary, anything else 404."""
    summary: dict[str, Any] = {"forwardingQueue": {"queued": 3}}
    server = MetricsServer("127.0.0.1", 0, lambda: summary)
    await server.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}"
        ) as client:
            text = await client.get("/metrics")
            json_summary = await client.get("/metrics.json")
            missing = await client.get("/nothing")
            posted = await client.post("/metrics")
    finally:
        await server.stop()

    assert text.status_code == 200
    for name in (
        "forwarding_queue_queued",
        "forwarding_active_workers",
        "forwarding_processing",
        "runledger_relay_deliveries_total",
        "runledger_relay_retries_total",
        "runledger_relay_dead_commands_total",
        "runledger_relay_gaps_total",
        "runledger_relay_lag_seconds_bucket",
    ):
        assert name in text.text
    assert json_summary.json() == summary
    assert missing.status_code == 404
    assert posted.status_code == 405


async def test_figures_follow_the_work(database_url: str, pool: asyncpg.Pool) -> None:
    """While a delivery hangs the summary shows a busy worker and the queue; after
    it, the delivered, retried and lag figures have moved."""
    command_id = await new_command(pool)
    delivered_before = sample("runledger_relay_delivered_events_total")
    retried_before = sample("runledger_relay_deliveries_total", {"result": "retried"})
    lag_count_before = sample("runledger_relay_lag_seconds_count")
    release = asyncio.Event()

    async with running_sink() as sink:

        async def fail_then_hang(number: int, _delivery_id: str) -> Answer:
            if number == 0:
                return Answer(500)
            await release.wait()
            return Answer()

        sink.behaviour = fail_then_hang
        async with running_relay(
            database_url, sink, relay_backoff_base=0.1, relay_scan_interval=0.2
        ) as relay:
            await store_events(pool, command_id, range(1, 11))
            await wait_until(lambda: len(sink.requests) == 2, within=30)
            await wait_until(
                lambda: relay.summary()["forwardingQueue"]["queued"] == 10, within=30
            )

            busy = relay.summary()["forwardingQueue"]
            assert busy == {"queued": 10, "activeWorkers": 1, "processing": True}
            assert sample("forwarding_active_workers") >= 1
            assert sample("forwarding_processing") == 1

            release.set()
            await wait_until(lambda: len(sink.applied) == 10, within=30)
            await wait_until(
                lambda: relay.summary()["forwardingQueue"]["queued"] == 0, within=30
            )
            idle = relay.summary()["forwardingQueue"]
            assert idle == {"queued": 0, "activeWorkers": 0, "processing": False}

    assert sample("runledger_relay_delivered_events_total") - delivered_before == 10
    assert (
        sample("runledger_relay_deliveries_total", {"result": "retried"})
        - retried_before
        == 1
    )
    assert sample("runledger_relay_lag_seconds_count") - lag_count_before == 10
