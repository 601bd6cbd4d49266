"""Reading runners' frames: decoding, checking and limiting, without any I/O.

A frame is either refused as a whole (:class:`~core.errors.ProtocolError`,
answered with an ``error`` message) or split into the events that may be
stored and the events refused for good (answered in ``event-ack``). One bad
event never spoils the others in its frame.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

from core import wire
from core.errors import LimitExceeded, ProtocolError

# Postgres jsonb cannot hold the NUL character in a string.
_JSON_NUL = b"\\u0000"
_LARGEST_SEQUENCE = 2**63 - 1
_json_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class PendingEvent:
    """A checked event on its way to the writer; legacy ones lack a sequence."""

    command_id: uuid.UUID
    kind: str
    id: uuid.UUID
    sequence: int | None
    stream: str | None
    data: bytes
    payload_json: str | None
    # Seconds since 1970; Postgres turns them into a timestamp.
    emitted_at: float | None
    numbered_by_broker: bool = False

    def same_content(self, other: PendingEvent) -> bool:
        """Whether two events carry the same id, kind, stream, data and payload."""
        return (
            self.id == other.id
            and self.kind == other.kind
            and self.stream == other.stream
            and self.data == other.data
            and self.payload_json == other.payload_json
        )


@dataclass(slots=True)
class DecodedFrame:
    """What one frame asks for: events to store, events refused, or a notice."""

    events: list[PendingEvent] = field(default_factory=list)
    refused: list[wire.Refused] = field(default_factory=list)
    command_started: wire.CommandStarted | None = None
    received_events: int = 0


class _Envelope(msgspec.Struct):
    """A frame read loosely, to refuse its events one by one."""

    type: str | None = None
    events: list[msgspec.Raw] | None = None
    event: msgspec.Raw | None = None


class _EventIdentity(msgspec.Struct):
    """Whatever can be read of a bad event's identity, to name it in a refusal."""

    id: str | None = None
    command_id: str | None = None
    sequence: Any = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_event_decoder = msgspec.json.Decoder(wire.WireEvent)
_identity_decoder = msgspec.json.Decoder(_EventIdentity)
_KNOWN_TYPES = ("events", "event", "command-started")


def decode_frame(frame: bytes, limits: wire.Limits) -> DecodedFrame:
    """Decode and check one frame from a runner.

    Raises ProtocolError (or LimitExceeded) when the frame is refused as a
    whole: too large, not JSON, an unknown type, too many events, or a shape
    that is not a message at all.
    """
    if len(frame) > limits.max_frame_bytes:
        raise LimitExceeded(
            "frame_too_large",
            f"frame of {len(frame)} bytes is over the limit of "
            f"{limits.max_frame_bytes} bytes (max_frame_bytes)",
        )

    # The strict decoder is the fast path; the loose one finds what was wrong.
    try:
        message = wire.runner_message_decoder.decode(frame)
    except msgspec.ValidationError as error:
        return _decode_loosely(frame, limits, error)
    except msgspec.DecodeError as error:
        raise ProtocolError("malformed", f"frame is not valid JSON: {error}") from None

    if isinstance(message, wire.CommandStarted):
        return DecodedFrame(command_started=message)
    wire_events = (
        message.events if isinstance(message, wire.EventsMessage) else [message.event]
    )
    _check_batch_size(len(wire_events), limits)

    decoded = DecodedFrame(received_events=len(wire_events))
    for wire_event in wire_events:
        try:
            decoded.events.append(check_event(wire_event, limits))
        except ProtocolError as error:
            decoded.refused.append(_refusal(error, wire_event))
    return decoded


def _decode_loosely(
    frame: bytes, limits: wire.Limits, strict_error: msgspec.ValidationError
) -> DecodedFrame:
    try:
        envelope = _envelope_decoder.decode(frame)
    except msgspec.ValidationError:
        raise ProtocolError(
            "invalid", f"frame is not a runledger message: {strict_error}"
        ) from None

    if envelope.type not in _KNOWN_TYPES:
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {envelope.type!r}; expected one of "
            + ", ".join(_KNOWN_TYPES),
        )
    if envelope.type == "events" and envelope.events is not None:
        raw_events = envelope.events
    elif envelope.type == "event" and envelope.event is not None:
        raw_events = [envelope.event]
    else:
        raise ProtocolError(
            "invalid", f"malformed {envelope.type!r} message: {strict_error}"
        )
    _check_batch_size(len(raw_events), limits)

    decoded = DecodedFrame(received_events=len(raw_events))
    for raw_event in raw_events:
        try:
            wire_event = _event_decoder.decode(raw_event)
        except msgspec.ValidationError as error:
            decoded.refused.append(_refusal_of_raw(raw_event, str(error)))
            continue
        try:
            decoded.events.append(check_event(wire_event, limits))
        except ProtocolError as error:
            decoded.refused.append(_refusal(error, wire_event))
    return decoded


def _check_batch_size(count: int, limits: wire.Limits) -> None:
    if count > limits.max_batch_events:
        raise LimitExceeded(
            "batch_too_large",
            f"batch of {count} events is over the limit of "
            f"{limits.max_batch_events} events (max_batch_events)",
        )


def check_event(event: wire.WireEvent, limits: wire.Limits) -> PendingEvent:
    """The event ready for the writer; raises ProtocolError naming the fault."""
    if event.kind not in wire.EVENT_KINDS:
        raise ProtocolError(
            "invalid",
            f"unknown event kind {event.kind!r}; expected one of "
            + ", ".join(wire.EVENT_KINDS),
        )
    if event.kind == "output" and event.stream not in wire.STREAMS:
        raise ProtocolError(
            "invalid", "an output event needs stream 'stdout' or 'stderr'"
        )
    if event.kind != "output" and event.stream is not None:
        raise ProtocolError("invalid", f"a {event.kind} event has no stream")
    if event.sequence is not None and not 0 < event.sequence <= _LARGEST_SEQUENCE:
        raise ProtocolError("invalid", "sequence must be a positive 64-bit integer")

    payload_json: bytes | None = None
    if event.payload is not None:
        payload_json = _json_encoder.encode(event.payload)
        if _JSON_NUL in payload_json:
            raise ProtocolError(
                "invalid", "payload strings may not contain the NUL character"
            )

    size = len(event.data) + len(payload_json or b"")
    if size > limits.max_event_bytes:
        raise LimitExceeded(
            "too_large",
            f"event of {size} bytes is over the limit of "
            f"{limits.max_event_bytes} bytes (max_event_bytes)",
        )

    emitted_at = event.emitted_at
    if emitted_at is not None and not (
        math.isfinite(emitted_at) and 0 <= emitted_at < 2**34
    ):
        raise ProtocolError(
            "invalid", "emitted_at must be seconds since 1970 (a finite number)"
        )

    return PendingEvent(
        command_id=event.command_id,
        kind=event.kind,
        # Numbered once, here, so a resend after a failed commit matches.
        id=event.id if event.id is not None else uuid.uuid4(),
        sequence=event.sequence,
        stream=event.stream,
        data=event.data,
        payload_json=payload_json.decode() if payload_json is not None else None,
        emitted_at=emitted_at,
        numbered_by_broker=event.sequence is None,
    )


def _refusal(error: ProtocolError, event: wire.WireEvent) -> wire.Refused:
    return wire.Refused(
        code=error.code,
        reason=error.reason,
        id=event.id,
        command_id=event.command_id,
        sequence=event.sequence,
    )


def _refusal_of_raw(raw_event: msgspec.Raw, reason: str) -> wire.Refused:
    # Name the event as far as its fields can be read; a runner matches on id.
    refusal = wire.Refused(code="invalid", reason=f"event is not valid: {reason}")
    try:
        identity = _identity_decoder.decode(raw_event)
    except msgspec.MsgspecError:
        return refusal
    refusal.id = _uuid_or_none(identity.id)
    refusal.command_id = _uuid_or_none(identity.command_id)
    if isinstance(identity.sequence, int) and not isinstance(identity.sequence, bool):
        refusal.sequence = identity.sequence
    return refusal


def _uuid_or_none(text: str | None) -> uuid.UUID | None:
    if text is None:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


class RateLimiter:
    """A token bucket of events per second, with one second of burst."""

    def __init__(self, events_per_second: int, clock: Any = time.monotonic) -> None:
        self.events_per_second = events_per_second
        self._clock = clock
        self._tokens = float(events_per_second)
        self._updated = clock()

    def try_take(self, events: int) -> bool:
        """Take ``events`` tokens if there are enough; False leaves the bucket as is."""
        now = self._clock()
        self._tokens = min(
            float(self.events_per_second),
            self._tokens + (now - self._updated) * self.events_per_second,
        )
        self._updated = now
        if events > self._tokens:
            return False
        self._tokens -= events
        return True
