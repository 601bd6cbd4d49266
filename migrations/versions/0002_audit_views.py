"""Delivery audit views, the retention record, and the indexes they need.

Views (all read-only, computed when queried):

- ``audit_event_delivery``: one row per stored event, with the delivery that
  carried it (NULL while undelivered) and its stored-to-delivered lag.
- ``audit_delivery_lag``: one row per delivered event, led by the delivery;
  cheap to filter by ``delivered_at`` (yesterday's lag, say).
- ``audit_commands``: per command, what was stored, what is missing, what
  was refused, delivered, pending or dead, the lag, and verdicts (lost, dead).
- ``audit_runners``: the same rolled up per runner, with last seen and
  refused events.
- ``audit_system``: one row of totals, ingest rate and queue depth.

``pruned_commands`` records what retention removed, so the audit can tell a
pruned command from one that lost its events.

Indexes are built concurrently, outside the revision's transaction, with a
lock timeout (see ``migrations/online.py``), so ingest carries on meanwhile.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import TIMESTAMP, UUID

from migrations.online import (
    bound_lock_waits,
    create_index_concurrently,
    drop_index_concurrently,
)

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = TIMESTAMP(timezone=True)

# (name, table, columns, using, where)
INDEXES: tuple[tuple[str, str, tuple[str, ...], str | None, str | None], ...] = (
    # Finds the delivery that covers an event, and says "none" at once for the
    # undelivered tail.
    (
        "deliveries_command_last_sequence",
        "deliveries",
        ("command_id", "last_sequence", "first_sequence"),
        None,
        None,
    ),
    # Events per minute; BRIN because stored_at grows with the table and a
    # B-tree would cost every insert more.
    ("events_stored_at_brin", "events", ("stored_at",), "brin", None),
    (
        "refused_events_runner",
        "refused_events",
        ("runner_id", "refused_at"),
        None,
        None,
    ),
    # Retention removes a command's applied deliveries by command.
    ("applied_deliveries_command", "applied_deliveries", ("command_id",), None, None),
    # Retention looks for commands finished before a cutoff.
    (
        "commands_finished_at",
        "commands",
        ("finished_at",),
        None,
        "finished_at IS NOT NULL",
    ),
)

AUDIT_EVENT_DELIVERY = """
CREATE VIEW audit_event_delivery AS
SELECT
    e.command_id,
    e.sequence,
    e.kind,
    e.stored_at,
    covering.delivery_id,
    covering.delivered_at,
    covering.late,
    covering.delivered_at - e.stored_at AS delivery_lag
FROM events AS e
LEFT JOIN LATERAL (
    SELECT d.delivery_id, d.delivered_at, d.late
    FROM deliveries AS d
    WHERE d.command_id = e.command_id
      AND d.last_sequence >= e.sequence
      AND d.first_sequence <= e.sequence
      -- A delivery can only have carried events stored before it; this
      -- tells a late event from the skipped gap a range spans.
      AND d.delivered_at >= e.stored_at
    ORDER BY d.last_sequence
    LIMIT 1
) AS covering ON true
"""

AUDIT_DELIVERY_LAG = """
CREATE VIEW audit_delivery_lag AS
SELECT
    d.command_id,
    d.delivery_id,
    e.sequence,
    e.stored_at,
    d.delivered_at,
    d.late,
    d.delivered_at - e.stored_at AS delivery_lag
FROM deliveries AS d
JOIN events AS e
  ON e.command_id = d.command_id
 AND e.sequence BETWEEN d.first_sequence AND d.last_sequence
 AND e.stored_at <= d.delivered_at
"""

AUDIT_COMMANDS = """
CREATE VIEW audit_commands AS
WITH numbered AS (
    SELECT
        command_id,
        sequence,
        stored_at,
        delivered_at,
        delivery_lag,
        lag(sequence, 1, 0::bigint) OVER by_sequence AS previous_sequence,
        row_number() OVER by_sequence AS position
    FROM audit_event_delivery
    WINDOW by_sequence AS (PARTITION BY command_id ORDER BY sequence)
),
event_figures AS (
    SELECT
        command_id,
        count(*) AS events_stored,
        max(sequence) AS highest_sequence,
        -- Sequences start at 1 without holes, so the prefix is where the
        -- sequence still equals its position.
        coalesce(max(sequence) FILTER (WHERE sequence = position), 0)
            AS contiguous_through,
        string_agg(
            CASE
                WHEN sequence - previous_sequence = 2
                THEN (previous_sequence + 1)::text
                ELSE (previous_sequence + 1)::text || '-' || (sequence - 1)::text
            END,
            ', ' ORDER BY sequence
        ) FILTER (WHERE sequence - previous_sequence > 1) AS missing_ranges,
        count(delivered_at) AS delivered_events,
        min(stored_at) FILTER (WHERE delivered_at IS NULL) AS oldest_undelivered_at,
        percentile_cont(0.5) WITHIN GROUP (ORDER BY delivery_lag) AS lag_p50,
        max(delivery_lag) AS lag_max
    FROM numbered
    GROUP BY command_id
),
gap_figures AS (
    SELECT
        command_id,
        count(*) AS gaps_recorded,
        count(skipped_at) AS gaps_skipped
    FROM gaps
    GROUP BY command_id
),
refusal_figures AS (
    SELECT
        command_id,
        count(*) AS events_refused,
        count(*) FILTER (WHERE code = 'conflict') AS conflicts_refused
    FROM refused_events
    WHERE command_id IS NOT NULL
    GROUP BY command_id
),
figures AS (
    SELECT
        c.id AS command_id,
        c.runner_id,
        c.status,
        c.created_at,
        c.finished_at,
        coalesce(f.events_stored, 0) AS events_stored,
        coalesce(f.highest_sequence, 0) AS highest_sequence,
        coalesce(f.contiguous_through, 0) AS contiguous_through,
        coalesce(f.highest_sequence - f.events_stored, 0) AS missing_events,
        f.missing_ranges,
        coalesce(g.gaps_recorded, 0) AS gaps_recorded,
        coalesce(g.gaps_skipped, 0) AS gaps_skipped,
        coalesce(r.conflicts_refused, 0) AS conflicts_refused,
        coalesce(r.events_refused, 0) AS events_refused,
        coalesce(f.delivered_events, 0) AS delivered_events,
        coalesce(f.events_stored - f.delivered_events, 0) AS undelivered_events,
        cd.state AS delivery_state,
        cd.delivered_through,
        cd.attempts AS delivery_attempts,
        cd.last_status AS last_delivery_status,
        cd.last_error AS last_delivery_error,
        f.oldest_undelivered_at,
        f.lag_p50,
        f.lag_max,
        c.verification_matched,
        p.started_at AS pruned_at
    FROM commands AS c
    LEFT JOIN event_figures AS f ON f.command_id = c.id
    LEFT JOIN command_delivery AS cd ON cd.command_id = c.id
    LEFT JOIN gap_figures AS g ON g.command_id = c.id
    LEFT JOIN refusal_figures AS r ON r.command_id = c.id
    LEFT JOIN pruned_commands AS p ON p.command_id = c.id
)
SELECT
    command_id,
    runner_id,
    status,
    created_at,
    finished_at,
    events_stored,
    highest_sequence,
    contiguous_through,
    missing_events,
    missing_ranges,
    gaps_recorded,
    gaps_skipped,
    conflicts_refused,
    events_refused,
    delivered_events,
    CASE WHEN delivery_state = 'dead' THEN 0 ELSE undelivered_events END
        AS pending_events,
    CASE WHEN delivery_state = 'dead' THEN undelivered_events ELSE 0 END
        AS dead_events,
    delivery_state,
    delivered_through,
    delivery_attempts,
    last_delivery_status,
    last_delivery_error,
    CASE WHEN delivery_state IS DISTINCT FROM 'dead' THEN oldest_undelivered_at END
        AS oldest_pending_at,
    CASE WHEN delivery_state IS DISTINCT FROM 'dead'
        THEN now() - oldest_undelivered_at END AS oldest_pending_age,
    lag_p50,
    lag_max,
    verification_matched,
    pruned_at,
    -- Lost: the output did not verify, or sequences are missing for good
    -- (the command finished, or the relay gave up waiting and skipped them).
    pruned_at IS NULL AND (
        verification_matched IS FALSE
        OR (
            missing_events > 0
            AND (
                status IN ('succeeded', 'failed', 'cancelled', 'lost')
                OR gaps_skipped > 0
            )
        )
    ) AS lost,
    coalesce(delivery_state = 'dead', false) AS dead
FROM figures
"""

AUDIT_RUNNERS = """
CREATE VIEW audit_runners AS
WITH command_rollup AS (
    SELECT
        runner_id,
        count(*) AS commands,
        count(*) FILTER (
            WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'lost')
        ) AS commands_active,
        sum(events_stored)::bigint AS events_stored,
        sum(missing_events)::bigint AS missing_events,
        count(*) FILTER (WHERE missing_events > 0) AS commands_with_missing,
        sum(gaps_recorded)::bigint AS gaps_recorded,
        sum(delivered_events)::bigint AS delivered_events,
        sum(pending_events)::bigint AS pending_events,
        sum(dead_events)::bigint AS dead_events,
        min(oldest_pending_at) AS oldest_pending_at,
        count(*) FILTER (WHERE verification_matched) AS verification_matched,
        count(*) FILTER (WHERE verification_matched IS FALSE)
            AS verification_mismatched,
        count(*) FILTER (WHERE lost) AS lost_commands,
        count(*) FILTER (WHERE dead) AS dead_commands,
        count(*) FILTER (WHERE pruned_at IS NOT NULL) AS pruned_commands
    FROM audit_commands
    GROUP BY runner_id
),
lag_rollup AS (
    -- Led by the deliveries, which is several times cheaper than looking up
    -- each event's delivery.
    SELECT
        c.runner_id,
        percentile_cont(0.5) WITHIN GROUP (ORDER BY l.delivery_lag) AS lag_p50,
        max(l.delivery_lag) AS lag_max
    FROM audit_delivery_lag AS l
    JOIN commands AS c ON c.id = l.command_id
    GROUP BY c.runner_id
),
refusal_rollup AS (
    SELECT
        runner_id,
        count(*) AS events_refused,
        count(*) FILTER (WHERE code = 'conflict') AS conflicts_refused,
        max(refused_at) AS last_refused_at
    FROM refused_events
    WHERE runner_id IS NOT NULL
    GROUP BY runner_id
)
SELECT
    r.id AS runner_id,
    r.name AS runner_name,
    r.last_seen_at,
    (
        r.connected_at IS NOT NULL
        AND (r.disconnected_at IS NULL OR r.disconnected_at < r.connected_at)
    ) AS connected,
    r.revoked_at,
    coalesce(cr.commands, 0) AS commands,
    coalesce(cr.commands_active, 0) AS commands_active,
    coalesce(cr.events_stored, 0) AS events_stored,
    coalesce(cr.missing_events, 0) AS missing_events,
    coalesce(cr.commands_with_missing, 0) AS commands_with_missing,
    coalesce(cr.gaps_recorded, 0) AS gaps_recorded,
    coalesce(rr.conflicts_refused, 0) AS conflicts_refused,
    coalesce(rr.events_refused, 0) AS events_refused,
    rr.last_refused_at,
    coalesce(cr.delivered_events, 0) AS delivered_events,
    coalesce(cr.pending_events, 0) AS pending_events,
    coalesce(cr.dead_events, 0) AS dead_events,
    cr.oldest_pending_at,
    now() - cr.oldest_pending_at AS oldest_pending_age,
    lr.lag_p50,
    lr.lag_max,
    coalesce(cr.verification_matched, 0) AS verification_matched,
    coalesce(cr.verification_mismatched, 0) AS verification_mismatched,
    coalesce(cr.lost_commands, 0) AS lost_commands,
    coalesce(cr.dead_commands, 0) AS dead_commands,
    coalesce(cr.pruned_commands, 0) AS pruned_commands
FROM runners AS r
LEFT JOIN command_rollup AS cr ON cr.runner_id = r.id
LEFT JOIN lag_rollup AS lr ON lr.runner_id = r.id
LEFT JOIN refusal_rollup AS rr ON rr.runner_id = r.id
"""

AUDIT_SYSTEM = """
CREATE VIEW audit_system AS
WITH command_totals AS (
    SELECT
        count(*) AS commands,
        count(*) FILTER (
            WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'lost')
        ) AS commands_active,
        coalesce(sum(events_stored), 0)::bigint AS events_stored,
        coalesce(sum(missing_events), 0)::bigint AS missing_events,
        coalesce(sum(delivered_events), 0)::bigint AS delivered_events,
        coalesce(sum(pending_events), 0)::bigint AS queue_depth,
        count(*) FILTER (WHERE pending_events > 0) AS commands_waiting,
        coalesce(sum(dead_events), 0)::bigint AS dead_events,
        min(oldest_pending_at) AS oldest_pending_at,
        count(*) FILTER (WHERE lost) AS lost_commands,
        count(*) FILTER (WHERE dead) AS dead_commands,
        coalesce(sum(gaps_recorded), 0)::bigint AS gaps_recorded
    FROM audit_commands
),
refusal_totals AS (
    SELECT
        count(*) AS events_refused,
        count(*) FILTER (WHERE code = 'conflict') AS conflicts_refused
    FROM refused_events
),
recent_lag AS (
    SELECT
        percentile_cont(0.5) WITHIN GROUP (ORDER BY delivery_lag) AS lag_p50,
        max(delivery_lag) AS lag_max
    FROM audit_delivery_lag
    WHERE delivered_at > now() - interval '1 hour'
),
ingest_rate AS (
    SELECT
        count(*) FILTER (WHERE stored_at > now() - interval '1 minute')
            AS events_last_minute,
        round(count(*) / 15.0, 1) AS events_per_minute
    FROM events
    WHERE stored_at > now() - interval '15 minutes'
)
SELECT
    now() AS checked_at,
    (SELECT count(*) FROM runners WHERE revoked_at IS NULL) AS runners,
    (
        SELECT count(*) FROM runners
        WHERE connected_at IS NOT NULL
          AND (disconnected_at IS NULL OR disconnected_at < connected_at)
    ) AS runners_connected,
    ct.commands,
    ct.commands_active,
    ct.events_stored,
    ct.missing_events,
    ct.delivered_events,
    ct.queue_depth,
    ct.commands_waiting,
    ct.dead_events,
    ct.oldest_pending_at,
    now() - ct.oldest_pending_at AS oldest_pending_age,
    ct.lost_commands,
    ct.dead_commands,
    ct.gaps_recorded,
    rt.events_refused,
    rt.conflicts_refused,
    ir.events_last_minute,
    ir.events_per_minute,
    rl.lag_p50 AS lag_p50_last_hour,
    rl.lag_max AS lag_max_last_hour
FROM command_totals AS ct, refusal_totals AS rt, recent_lag AS rl, ingest_rate AS ir
"""

# Dependants first, for dropping.
VIEWS = (
    "audit_system",
    "audit_runners",
    "audit_commands",
    "audit_delivery_lag",
    "audit_event_delivery",
)


def upgrade() -> None:
    # Indexes first: each is built and committed on its own, and is skipped
    # when a rerun finds it built, so a failed upgrade can simply be rerun.
    for name, table, columns, using, where in INDEXES:
        create_index_concurrently(name, table, columns, using=using, where=where)

    bound_lock_waits()
    op.create_table(
        "pruned_commands",
        sa.Column("command_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("highest_sequence", sa.BigInteger, nullable=False),
        sa.Column("events_removed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column(
            "started_at", TIMESTAMPTZ, nullable=False, server_default=sa.text("now()")
        ),
        sa.Column("completed_at", TIMESTAMPTZ),
    )
    for statement in (
        AUDIT_EVENT_DELIVERY,
        AUDIT_DELIVERY_LAG,
        AUDIT_COMMANDS,
        AUDIT_RUNNERS,
        AUDIT_SYSTEM,
    ):
        op.execute(statement)


def downgrade() -> None:
    bound_lock_waits()
    for view in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {view}")
    op.drop_table("pruned_commands", if_exists=True)

    for name, *_ in reversed(INDEXES):
        drop_index_concurrently(name)
