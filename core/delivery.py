"""What the relay sends to a sink, and what the web tier's ingest reads.

A batched delivery is one JSON object::

    {"delivery_id": "...", "command_id": "...", "late": false,
     "events": [DeliveredEvent, ...]}

In single-event mode (for sinks built for the predecessor) the body is one
DeliveredEvent object. Either way the ``webhook-id`` header carries the
delivery id, which stays the same on every retry of the same events.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec


class DeliveredEvent(msgspec.Struct, omit_defaults=True):
    """One stored event as the sink sees it; ``data`` is base64 in JSON."""

    id: uuid.UUID
    command_id: uuid.UUID
    sequence: int
    kind: str
    stream: str | None = None
    data: bytes = b""
    payload: dict[str, Any] | None = None
    emitted_at: datetime | None = None
    stored_at: datetime | None = None
    late: bool = False


class DeliveryBatch(msgspec.Struct):
    """Several consecutive events of one command, in sequence order."""

    delivery_id: str
    command_id: uuid.UUID
    events: list[DeliveredEvent]
    late: bool = False


def delivery_id_for(
    command_id: uuid.UUID, first_sequence: int, last_sequence: int
) -> str:
    """A delivery id that is the same on every retry of the same events."""
    return f"{command_id}:{first_sequence}-{last_sequence}"


_encoder = msgspec.json.Encoder()
batch_decoder = msgspec.json.Decoder(DeliveryBatch)
event_decoder = msgspec.json.Decoder(DeliveredEvent)


def encode(value: msgspec.Struct) -> bytes:
    """JSON bytes of a delivery body."""
    return _encoder.encode(value)
