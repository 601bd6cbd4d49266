"""Table definitions (SQLAlchemy Core), the schema's single description.

Every per-command table leads with ``command_id`` so the schema distributes
by it (see ``docs/scaling.md``). Migrations in ``migrations/versions`` create
exactly this; a test compares the two.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID

metadata = MetaData()

NOW = text("now()")
TIMESTAMPTZ = TIMESTAMP(timezone=True)

COMMAND_STATUSES = (
    "queued",  # stored, not yet sent to its runner
    "dispatched",  # sent to the runner, no event back yet
    "running",  # the child runs
    "succeeded",  # exit code 0
    "failed",  # non-zero exit code, or the child could not start
    "cancelled",  # stopped on request
    "lost",  # the child died with its runner; the runner said so on restart
)
FINAL_STATUSES = ("succeeded", "failed", "cancelled", "lost")

runners = Table(
    "runners",
    metadata,
    Column(
        "id",
        UUID(as_uuid=True),
        primary_key=True,
        server_default=text("gen_random_uuid()"),
    ),
    Column("name", Text, nullable=False, unique=True),
    # SHA-256 of the token, hex; the token itself is never stored.
    Column("token_hash", Text, nullable=False, unique=True),
    Column("created_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    Column("revoked_at", TIMESTAMPTZ),
    Column("last_seen_at", TIMESTAMPTZ),
    Column("connected_at", TIMESTAMPTZ),
    Column("disconnected_at", TIMESTAMPTZ),
    # Raised on every accepted connection; writes from an older epoch are fenced.
    Column("connection_epoch", BigInteger, nullable=False, server_default="0"),
    Column("broker_id", Text),
)

commands = Table(
    "commands",
    metadata,
    Column(
        "id",
        UUID(as_uuid=True),
        primary_key=True,
        server_default=text("gen_random_uuid()"),
    ),
    Column("runner_id", UUID(as_uuid=True), ForeignKey("runners.id"), nullable=False),
    Column("argv", JSONB, nullable=False),
    Column("cwd", Text),
    Column("env", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("created_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    Column("dispatched_at", TIMESTAMPTZ),
    Column("cancel_requested_at", TIMESTAMPTZ),
    # The summary below is the web tier's projection of delivered events.
    Column("status", Text, nullable=False, server_default="queued"),
    Column("exit_code", Integer),
    Column("started_at", TIMESTAMPTZ),
    Column("finished_at", TIMESTAMPTZ),
    Column("last_activity_at", TIMESTAMPTZ),
    Column("applied_through", BigInteger, nullable=False, server_default="0"),
    Column("verification", JSONB),
    Column("verification_matched", Boolean),
    CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in COMMAND_STATUSES) + ")",
        name="commands_status_known",
    ),
)
Index("commands_runner_created", commands.c.runner_id, commands.c.created_at)
Index(
    "commands_undispatched",
    commands.c.runner_id,
    postgresql_where=text("dispatched_at IS NULL"),
)
# Retention looks for commands finished before a cutoff (revision 0002).
Index(
    "commands_finished_at",
    commands.c.finished_at,
    postgresql_where=text("finished_at IS NOT NULL"),
)

events = Table(
    "events",
    metadata,
    Column("command_id", UUID(as_uuid=True), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("id", UUID(as_uuid=True), nullable=False),
    # output | status | progress | exit
    Column("kind", Text, nullable=False),
    # stdout | stderr for output; NULL otherwise
    Column("stream", Text),
    Column("data", LargeBinary, nullable=False, server_default=text("''::bytea")),
    Column("payload", JSONB),
    Column("emitted_at", TIMESTAMPTZ),
    Column("stored_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    PrimaryKeyConstraint("command_id", "sequence", name="events_pkey"),
    UniqueConstraint("command_id", "id", name="events_command_id_id_key"),
    CheckConstraint("sequence > 0", name="events_sequence_positive"),
)
# Events per minute for the audit; BRIN keeps inserts cheap (revision 0002).
Index("events_stored_at_brin", events.c.stored_at, postgresql_using="brin")

command_delivery = Table(
    "command_delivery",
    metadata,
    Column(
        "command_id",
        UUID(as_uuid=True),
        ForeignKey("commands.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # Every event with sequence <= delivered_through has reached the sink
    # (or lies in a recorded gap).
    Column("delivered_through", BigInteger, nullable=False, server_default="0"),
    # active | dead | finished
    Column("state", Text, nullable=False, server_default="active"),
    Column("lease_owner", Text),
    Column("lease_expires_at", TIMESTAMPTZ),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", TIMESTAMPTZ),
    Column("first_failure_at", TIMESTAMPTZ),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("last_delivered_at", TIMESTAMPTZ),
    Column("updated_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    # The events of a failed delivery, resent unchanged so its id stays stable.
    Column("pending_first_sequence", BigInteger),
    Column("pending_last_sequence", BigInteger),
)
Index(
    "command_delivery_due",
    command_delivery.c.next_attempt_at,
    postgresql_where=text("state = 'active'"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("command_id", UUID(as_uuid=True), nullable=False),
    Column("delivery_id", Text, nullable=False),
    Column("first_sequence", BigInteger, nullable=False),
    Column("last_sequence", BigInteger, nullable=False),
    Column("event_count", Integer, nullable=False),
    Column("late", Boolean, nullable=False, server_default="false"),
    Column("attempts", Integer, nullable=False, server_default="1"),
    Column("delivered_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    PrimaryKeyConstraint("command_id", "delivery_id", name="deliveries_pkey"),
)
Index("deliveries_delivered_at", deliveries.c.delivered_at)
# Finds the delivery covering an event, for the audit views (revision 0002).
Index(
    "deliveries_command_last_sequence",
    deliveries.c.command_id,
    deliveries.c.last_sequence,
    deliveries.c.first_sequence,
)

gaps = Table(
    "gaps",
    metadata,
    Column("command_id", UUID(as_uuid=True), nullable=False),
    Column("first_missing", BigInteger, nullable=False),
    Column("last_missing", BigInteger, nullable=False),
    Column("detected_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    Column("skipped_at", TIMESTAMPTZ),
    PrimaryKeyConstraint("command_id", "first_missing", name="gaps_pkey"),
)

refused_events = Table(
    "refused_events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("runner_id", UUID(as_uuid=True)),
    Column("command_id", UUID(as_uuid=True)),
    Column("sequence", BigInteger),
    Column("event_id", Text),
    # A stable key: conflict, too_large, malformed, not_assigned, fenced, ...
    Column("code", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("refused_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
)
Index("refused_events_command", refused_events.c.command_id)
Index("refused_events_runner", refused_events.c.runner_id, refused_events.c.refused_at)

applied_deliveries = Table(
    "applied_deliveries",
    metadata,
    Column("delivery_id", Text, primary_key=True),
    Column("command_id", UUID(as_uuid=True), nullable=False),
    Column("applied_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
)
# Retention removes a command's applied deliveries by command (revision 0002).
Index("applied_deliveries_command", applied_deliveries.c.command_id)

# What retention removed, so the audit tells a pruned command from a lossy one.
pruned_commands = Table(
    "pruned_commands",
    metadata,
    Column("command_id", UUID(as_uuid=True), primary_key=True),
    Column("highest_sequence", BigInteger, nullable=False),
    Column("events_removed", BigInteger, nullable=False, server_default="0"),
    Column("started_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    Column("completed_at", TIMESTAMPTZ),
)
