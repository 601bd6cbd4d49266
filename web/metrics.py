"""Prometheus metrics of one web tier, in a registry of its own.

Counters move as requests are served; the gauges that describe the database
(forwarding queue depth, dead commands, commands by status) are read from
Postgres when ``/metrics`` is scraped.
"""

from __future__ import annotations

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from web.queries import health_queries as queries


class WebMetrics:
    """The counters and gauges one app exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries_applied = Counter(
            "runledger_web_deliveries_applied",
            "Deliveries from the relay applied to the command summaries",
            registry=self.registry,
        )
        self.deliveries_duplicate = Counter(
            "runledger_web_deliveries_duplicate",
            "Deliveries received again and ignored (already applied)",
            registry=self.registry,
        )
        self.deliveries_refused = Counter(
            "runledger_web_deliveries_refused",
            "Deliveries refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.events_applied = Counter(
            "runledger_web_events_applied",
            "Events applied to the command summaries",
            registry=self.registry,
        )
        self.verifications = Counter(
            "runledger_web_verifications",
            "Finished commands verified, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.pages_read = Counter(
            "runledger_web_event_pages_read",
            "Pages of events served by the read API",
            registry=self.registry,
        )
        self.long_polls = Gauge(
            "runledger_web_long_polls",
            "Reads waiting for new events now",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "runledger_forwarding_queue_events",
            "Stored events not yet delivered by the relay",
            registry=self.registry,
        )
        self.dead_commands = Gauge(
            "runledger_dead_commands",
            "Commands whose delivery is parked as dead",
            registry=self.registry,
        )
        self.commands = Gauge(
            "runledger_commands",
            "Commands by status",
            ["status"],
            registry=self.registry,
        )

    async def render(self, pool: asyncpg.Pool) -> bytes:
        """Read the database gauges, then the text exposition format."""
        async with pool.acquire() as connection:
            self.queue_depth.set(await connection.fetchval(queries.queue_depth) or 0)
            self.dead_commands.set(await connection.fetchval(queries.dead_count) or 0)
            for row in await connection.fetch(queries.commands_by_status):
                self.commands.labels(row["status"]).set(row["count"])
        return generate_latest(self.registry)
