"""Messages on the runner-broker WebSocket, and their limits.

Every message is one JSON text frame with a ``type`` field. ``bytes`` fields
travel as base64, so output is byte-exact whatever the child wrote.

Runner to broker:

- ``events``: a batch of events, each with ``id`` and per-command
  ``sequence`` (older runners may omit both; the broker assigns them).
- ``event``: one event on its own, as older runners send it.
- ``command-started``: the runner accepted a command and started its child.

Broker to runner:

- ``hello``: sent once after the upgrade, with the runner's identity and the
  limits the broker enforces, so the runner can chunk below them.
- ``event-ack``: the events now durable (``acknowledged``) and those refused
  for good (``refused``, each with a stable ``code`` and a human ``reason``).
- ``command`` / ``cancel``: work for the runner.
- ``error``: a whole frame was refused (malformed, too large, over a rate);
  the connection carries on.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

EVENT_KINDS = ("output", "status", "progress", "exit")
STREAMS = ("stdout", "stderr")


class WireEvent(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """One event as it travels; ``data`` is base64 in JSON."""

    command_id: uuid.UUID
    kind: str
    id: uuid.UUID | None = None
    sequence: int | None = None
    stream: str | None = None
    data: bytes = b""
    payload: dict[str, Any] | None = None
    emitted_at: float | None = None


class EventsMessage(msgspec.Struct, tag="events", tag_field="type"):
    """A batch of events from a runner."""

    events: list[WireEvent]


class LegacyEventMessage(msgspec.Struct, tag="event", tag_field="type"):
    """One event per message, as the predecessor's runners send."""

    event: WireEvent


class CommandStarted(msgspec.Struct, tag="command-started", tag_field="type"):
    """The runner has started the child of a command."""

    command_id: uuid.UUID
    pid: int | None = None


class Acknowledged(msgspec.Struct, array_like=True):
    """An event that is durable: (id, command_id, sequence)."""

    id: uuid.UUID
    command_id: uuid.UUID
    sequence: int


class Refused(msgspec.Struct, omit_defaults=True):
    """An event refused for good, with a stable code and a human reason."""

    code: str
    reason: str
    id: uuid.UUID | None = None
    command_id: uuid.UUID | None = None
    sequence: int | None = None


class EventAck(msgspec.Struct, tag="event-ack", tag_field="type", omit_defaults=True):
    """What became durable, and what was refused, from the runner's batches."""

    acknowledged: list[Acknowledged] = []
    refused: list[Refused] = []


class Limits(msgspec.Struct):
    """Limits the broker enforces; the runner chunks and batches below them."""

    max_frame_bytes: int
    max_batch_events: int
    max_event_bytes: int


class Hello(msgspec.Struct, tag="hello", tag_field="type"):
    """First message from the broker after a successful upgrade."""

    runner_id: uuid.UUID
    runner_name: str
    connection_epoch: int
    limits: Limits


class CommandMessage(msgspec.Struct, tag="command", tag_field="type"):
    """Run ``argv`` in ``cwd`` with ``env`` added to the runner's environment."""

    command_id: uuid.UUID
    argv: list[str]
    cwd: str | None = None
    env: dict[str, str] = {}


class CancelMessage(msgspec.Struct, tag="cancel", tag_field="type"):
    """Stop the child of a command: TERM, then KILL after a grace period."""

    command_id: uuid.UUID


class ErrorMessage(msgspec.Struct, tag="error", tag_field="type"):
    """A frame was refused as a whole; the connection carries on."""

    code: str
    reason: str


RunnerMessage = EventsMessage | LegacyEventMessage | CommandStarted
BrokerMessage = Hello | EventAck | CommandMessage | CancelMessage | ErrorMessage

_encoder = msgspec.json.Encoder()
runner_message_decoder = msgspec.json.Decoder(RunnerMessage)
broker_message_decoder = msgspec.json.Decoder(BrokerMessage)


def encode(message: msgspec.Struct) -> bytes:
    """JSON bytes of a wire message."""
    return _encoder.encode(message)
