"""Initial schema: runners, commands, the events outbox and delivery state.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = TIMESTAMP(timezone=True)
NOW = sa.text("now()")
NEW_UUID = sa.text("gen_random_uuid()")


def upgrade() -> None:
    op.create_table(
        "runners",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=NEW_UUID),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("token_hash", sa.Text, nullable=False, unique=True),
        sa.Column("created_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
        sa.Column("revoked_at", TIMESTAMPTZ),
        sa.Column("last_seen_at", TIMESTAMPTZ),
        sa.Column("connected_at", TIMESTAMPTZ),
        sa.Column("disconnected_at", TIMESTAMPTZ),
        sa.Column(
            "connection_epoch", sa.BigInteger, nullable=False, server_default="0"
        ),
        sa.Column("broker_id", sa.Text),
    )

    op.create_table(
        "commands",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=NEW_UUID),
        sa.Column(
            "runner_id", UUID(as_uuid=True), sa.ForeignKey("runners.id"), nullable=False
        ),
        sa.Column("argv", JSONB, nullable=False),
        sa.Column("cwd", sa.Text),
        sa.Column("env", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("created_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
        sa.Column("dispatched_at", TIMESTAMPTZ),
        sa.Column("cancel_requested_at", TIMESTAMPTZ),
        sa.Column("status", sa.Text, nullable=False, server_default="queued"),
        sa.Column("exit_code", sa.Integer),
        sa.Column("started_at", TIMESTAMPTZ),
        sa.Column("finished_at", TIMESTAMPTZ),
        sa.Column("last_activity_at", TIMESTAMPTZ),
        sa.Column("applied_through", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("verification", JSONB),
        sa.Column("verification_matched", sa.Boolean),
        sa.CheckConstraint(
            "status IN ('queued', 'dispatched', 'running', 'succeeded', 'failed', "
            "'cancelled', 'lost')",
            name="commands_status_known",
        ),
    )
    op.create_index("commands_runner_created", "commands", ["runner_id", "created_at"])
    op.create_index(
        "commands_undispatched",
        "commands",
        ["runner_id"],
        postgresql_where=sa.text("dispatched_at IS NULL"),
    )

    op.create_table(
        "events",
        sa.Column("command_id", UUID(as_uuid=True), nullable=False),
        sa.Column("sequence", sa.BigInteger, nullable=False),
        sa.Column("id", UUID(as_uuid=True), nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("stream", sa.Text),
        sa.Column(
            "data", sa.LargeBinary, nullable=False, server_default=sa.text("''::bytea")
        ),
        sa.Column("payload", JSONB),
        sa.Column("emitted_at", TIMESTAMPTZ),
        sa.Column("stored_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("command_id", "sequence", name="events_pkey"),
        sa.UniqueConstraint("command_id", "id", name="events_command_id_id_key"),
        sa.CheckConstraint("sequence > 0", name="events_sequence_positive"),
    )

    op.create_table(
        "command_delivery",
        sa.Column(
            "command_id",
            UUID(as_uuid=True),
            sa.ForeignKey("commands.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "delivered_through", sa.BigInteger, nullable=False, server_default="0"
        ),
        sa.Column("state", sa.Text, nullable=False, server_default="active"),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", TIMESTAMPTZ),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TIMESTAMPTZ),
        sa.Column("first_failure_at", TIMESTAMPTZ),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("last_delivered_at", TIMESTAMPTZ),
        sa.Column("updated_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
        sa.Column("pending_first_sequence", sa.BigInteger),
        sa.Column("pending_last_sequence", sa.BigInteger),
    )
    op.create_index(
        "command_delivery_due",
        "command_delivery",
        ["next_attempt_at"],
        postgresql_where=sa.text("state = 'active'"),
    )

    op.create_table(
        "deliveries",
        sa.Column("command_id", UUID(as_uuid=True), nullable=False),
        sa.Column("delivery_id", sa.Text, nullable=False),
        sa.Column("first_sequence", sa.BigInteger, nullable=False),
        sa.Column("last_sequence", sa.BigInteger, nullable=False),
        sa.Column("event_count", sa.Integer, nullable=False),
        sa.Column("late", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
        sa.Column("delivered_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("command_id", "delivery_id", name="deliveries_pkey"),
    )
    op.create_index("deliveries_delivered_at", "deliveries", ["delivered_at"])

    op.create_table(
        "gaps",
        sa.Column("command_id", UUID(as_uuid=True), nullable=False),
        sa.Column("first_missing", sa.BigInteger, nullable=False),
        sa.Column("last_missing", sa.BigInteger, nullable=False),
        sa.Column("detected_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
        sa.Column("skipped_at", TIMESTAMPTZ),
        sa.PrimaryKeyConstraint("command_id", "first_missing", name="gaps_pkey"),
    )

    op.create_table(
        "refused_events",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("runner_id", UUID(as_uuid=True)),
        sa.Column("command_id", UUID(as_uuid=True)),
        sa.Column("sequence", sa.BigInteger),
        sa.Column("event_id", sa.Text),
        sa.Column("code", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("refused_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    )
    op.create_index("refused_events_command", "refused_events", ["command_id"])

    op.create_table(
        "applied_deliveries",
        sa.Column("delivery_id", sa.Text, primary_key=True),
        sa.Column("command_id", UUID(as_uuid=True), nullable=False),
        sa.Column("applied_at", TIMESTAMPTZ, nullable=False, server_default=NOW),
    )


def downgrade() -> None:
    for table in (
        "applied_deliveries",
        "refused_events",
        "gaps",
        "deliveries",
        "command_delivery",
        "events",
        "commands",
        "runners",
    ):
        op.drop_table(table)
