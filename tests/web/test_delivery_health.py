"""The delivery-health figures."""

from __future__ import annotations

import asyncpg

from tests.web.conftest import StoredCommand, insert_event
from web.delivery_health import BUCKETS, delivery_health, reconstruct_depth


def test_queue_depth_is_rebuilt_backwards() -> None:
    """Going back a bucket adds what it delivered and removes what it stored."""
    # Buckets oldest first: stored 10, 0, 5; delivered 0, 8, 5; 2 waiting now.
    assert reconstruct_depth(2, [10, 0, 5], [0, 8, 5]) == [10.0, 2.0, 2.0]


def test_depth_never_goes_negative() -> None:
    """Figures that do not add up (a restart, a cleanup) clamp at zero."""
    assert reconstruct_depth(0, [0, 0], [0, 5]) == [5.0, 0.0]
    assert reconstruct_depth(0, [9, 0], [0, 0]) == [0.0, 0.0]


async def test_health_reads_stored_delivered_and_dead(
    pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """Events stored, deliveries, the waiting count and dead letters are read."""
    command_id = stored_command.command_id
    for sequence in range(1, 6):
        await insert_event(pool, command_id, sequence, data=b".")
    await pool.execute(
        "INSERT INTO deliveries (command_id, delivery_id, first_sequence,"
        " last_sequence, event_count) VALUES ($1, 'd', 1, 3, 3)",
        command_id,
    )
    await pool.execute(
        "UPDATE command_delivery SET delivered_through = 3, state = 'dead',"
        " last_error = 'boom' WHERE command_id = $1",
        command_id,
    )

    health = await delivery_health(pool)

    assert len(health.stored_per_second) == BUCKETS
    assert health.stored_last_hour == 5
    assert health.delivered_last_hour == 3
    assert health.queue_depth_now == 2
    assert [dead.command_id for dead in health.dead] == [command_id]
    assert health.dead[0].highest_stored == 5
    assert set(health.charts) == {"rates", "queue", "lag"}
