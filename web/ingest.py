"""Applying the relay's deliveries to the per-command summary.

A delivery is applied once: its id goes into ``applied_deliveries`` in the
same transaction as the summary changes, so a retry after a timeout changes
nothing. The events themselves are already in the events table (the broker
stored them); what the web tier keeps is the projection: status, exit code,
times, the in-order applied sequence, and on the exit event the end-to-end
verification.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import msgspec

from core import delivery as delivery_format
from core.errors import ProtocolError
from core.tables import COMMAND_STATUSES
from web.queries import web_queries as queries
from web.verification import verify_command


class UnknownCommandDelivery(ProtocolError):
    """A delivery names a command that is not stored."""


@dataclass(frozen=True)
class Delivery:
    """A decoded delivery body: one command's events, in sequence order."""

    delivery_id: str
    command_id: uuid.UUID
    events: list[delivery_format.DeliveredEvent]
    late: bool


@dataclass(frozen=True)
class Applied:
    """What applying a delivery did."""

    events: int
    duplicate: bool
    verification_matched: bool | None = None


class _Shape(msgspec.Struct):
    # Only tells a batch (it has "events") from a single event, without
    # building the events twice.
    events: msgspec.Raw = msgspec.Raw(b"")


_shape_decoder = msgspec.json.Decoder(_Shape)


def decode_delivery(body: bytes, signed_delivery_id: str) -> Delivery:
    """Read a DeliveryBatch, or a single DeliveredEvent, from a signed body.

    Raises ProtocolError (code ``malformed``) when the body is neither, mixes
    commands, or names another delivery id than the signed header.
    """
    try:
        shape = _shape_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise ProtocolError("malformed", f"body is not a delivery: {error}") from None

    try:
        if len(shape.events):
            batch = delivery_format.batch_decoder.decode(body)
            delivery = Delivery(
                batch.delivery_id, batch.command_id, batch.events, batch.late
            )
        else:
            event = delivery_format.event_decoder.decode(body)
            delivery = Delivery(
                signed_delivery_id, event.command_id, [event], event.late
            )
    except msgspec.ValidationError as error:
        raise ProtocolError(
            "malformed", f"delivery does not validate: {error}"
        ) from None

    if delivery.delivery_id != signed_delivery_id:
        raise ProtocolError(
            "malformed", "delivery_id in the body differs from the webhook-id header"
        )
    if any(event.command_id != delivery.command_id for event in delivery.events):
        raise ProtocolError("malformed", "a delivery carries one command's events")
    return delivery


async def apply_delivery(connection: asyncpg.Connection, delivery: Delivery) -> Applied:
    """Apply a delivery to its command's summary exactly once.

    Raises UnknownCommandDelivery when the command is not stored.
    """
    async with connection.transaction():
        # The row lock orders concurrent deliveries of the same command.
        command = await connection.fetchrow(queries.lock_command, delivery.command_id)
        if command is None:
            raise UnknownCommandDelivery(
                "unknown_command", f"command {delivery.command_id} is not stored"
            )
        first_time = await connection.fetchval(
            queries.record_applied_delivery, delivery.delivery_id, delivery.command_id
        )
        if first_time is None:
            return Applied(events=0, duplicate=True)

        exit_seen = False
        latest_activity: datetime | None = None
        for event in sorted(delivery.events, key=lambda event: event.sequence):
            when = event.emitted_at or event.stored_at or datetime.now(UTC)
            latest_activity = max(latest_activity or when, when)
            if event.kind == "status" and _payload_status(event.payload) == "running":
                await connection.execute(queries.mark_running, event.command_id, when)
            elif event.kind == "exit":
                await _mark_finished(connection, event, when)
                exit_seen = True

        # Late events fill a gap below what was applied; they do not move it.
        applied_through = command["applied_through"]
        if not delivery.late and delivery.events:
            applied_through = max(event.sequence for event in delivery.events)
        await connection.execute(
            queries.note_activity, delivery.command_id, latest_activity, applied_through
        )

        # A late output event changes what is stored, so a finished command's
        # verification is computed again.
        matched: bool | None = None
        if exit_seen or (delivery.late and command["status"] not in _OPEN_STATUSES):
            matched = await verify_command(connection, delivery.command_id)
        return Applied(
            events=len(delivery.events), duplicate=False, verification_matched=matched
        )


_OPEN_STATUSES = ("queued", "dispatched", "running")


async def _mark_finished(
    connection: asyncpg.Connection,
    event: delivery_format.DeliveredEvent,
    when: datetime,
) -> None:
    payload: Mapping[str, object] = event.payload or {}
    status = payload.get("status")
    if status not in COMMAND_STATUSES or status in _OPEN_STATUSES:
        # An exit without a known final status still ends the command.
        status = "failed"
    exit_code = payload.get("exit_code")
    await connection.execute(
        queries.mark_finished,
        event.command_id,
        status,
        exit_code if isinstance(exit_code, int) else None,
        when,
    )


def _payload_status(payload: Mapping[str, object] | None) -> object:
    return (payload or {}).get("status", "running")
