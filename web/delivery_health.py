"""The delivery-health figures: the last hour in buckets, and the dead letters.

Rates come from the events table (``stored_at``) and the deliveries log
(``delivered_at``, ``event_count``). The forwarding queue depth over time is
reconstructed backwards from its depth now: going back one bucket adds what
was delivered in it and removes what was stored in it. Lag is the time from
storing a delivery's last event to delivering it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from web.charts import Series, line_chart
from web.queries import health_queries as queries

WINDOW_SECONDS = 3600
BUCKET_SECONDS = 60
BUCKETS = WINDOW_SECONDS // BUCKET_SECONDS


@dataclass(frozen=True)
class DeadLetter:
    """A command whose delivery the relay parked."""

    command_id: uuid.UUID
    argv: list[str]
    runner_name: str
    delivered_through: int
    highest_stored: int
    attempts: int
    last_status: int | None
    last_error: str | None
    first_failure_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class DeliveryHealth:
    """Everything the delivery-health page shows."""

    stored_per_second: list[float]
    delivered_per_second: list[float]
    queue_depth: list[float]
    lag_average_seconds: list[float]
    lag_max_seconds: list[float]
    queue_depth_now: int
    stored_last_hour: int
    delivered_last_hour: int
    dead: list[DeadLetter]
    charts: dict[str, str]


def reconstruct_depth(
    depth_now: int, stored: list[int], delivered: list[int]
) -> list[float]:
    """Queue depth at the end of each bucket, oldest first, from the depth now."""
    depths = [0.0] * len(stored)
    depth = float(depth_now)
    for index in range(len(stored) - 1, -1, -1):
        depths[index] = max(depth, 0.0)
        depth = depth - stored[index] + delivered[index]
    return depths


async def delivery_health(pool: asyncpg.Pool) -> DeliveryHealth:
    """Read the last hour's figures and the dead letters."""
    now_bucket = int(time.time()) // BUCKET_SECONDS
    first_bucket = now_bucket - BUCKETS + 1

    def bucketed(rows: list[asyncpg.Record], column: str) -> list[float]:
        values = [0.0] * BUCKETS
        for row in rows:
            index = int(row["bucket"]) - first_bucket
            if 0 <= index < BUCKETS and row[column] is not None:
                values[index] = float(row[column])
        return values

    async with pool.acquire() as connection:
        stored_rows = await connection.fetch(
            queries.stored_by_bucket, BUCKET_SECONDS, first_bucket
        )
        delivered_rows = await connection.fetch(
            queries.delivered_by_bucket, BUCKET_SECONDS, first_bucket
        )
        lag_rows = await connection.fetch(
            queries.lag_by_bucket, BUCKET_SECONDS, first_bucket
        )
        depth_now = int(await connection.fetchval(queries.queue_depth) or 0)
        dead_rows = await connection.fetch(queries.dead_letters)

    stored = [int(value) for value in bucketed(stored_rows, "events")]
    delivered = [int(value) for value in bucketed(delivered_rows, "events")]
    depth = reconstruct_depth(depth_now, stored, delivered)
    stored_rate = [value / BUCKET_SECONDS for value in stored]
    delivered_rate = [value / BUCKET_SECONDS for value in delivered]
    lag_average = bucketed(lag_rows, "average_seconds")
    lag_max = bucketed(lag_rows, "max_seconds")

    x_labels = ["60 min ago", "45", "30", "15", "now"]
    charts = {
        "rates": line_chart(
            "Events per second",
            "events/s",
            [
                Series("stored", "#2563eb", stored_rate),
                Series("delivered", "#16a34a", delivered_rate),
            ],
            x_labels,
        ),
        "queue": line_chart(
            "Forwarding queue depth",
            "events",
            [Series("waiting to be delivered", "#d97706", depth)],
            x_labels,
        ),
        "lag": line_chart(
            "Forward lag",
            "seconds",
            [
                Series("average", "#7c3aed", lag_average),
                Series("maximum", "#db2777", lag_max),
            ],
            x_labels,
        ),
    }
    return DeliveryHealth(
        stored_per_second=stored_rate,
        delivered_per_second=delivered_rate,
        queue_depth=depth,
        lag_average_seconds=lag_average,
        lag_max_seconds=lag_max,
        queue_depth_now=depth_now,
        stored_last_hour=sum(stored),
        delivered_last_hour=sum(delivered),
        dead=[
            DeadLetter(
                command_id=row["command_id"],
                argv=json.loads(row["argv"]),
                runner_name=row["runner_name"],
                delivered_through=row["delivered_through"],
                highest_stored=row["highest_stored"],
                attempts=row["attempts"],
                last_status=row["last_status"],
                last_error=row["last_error"],
                first_failure_at=row["first_failure_at"],
                updated_at=row["updated_at"],
            )
            for row in dead_rows
        ],
        charts=charts,
    )
