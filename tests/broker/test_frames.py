"""Decoding and checking runners' frames, without a server."""

from __future__ import annotations

import json
import uuid

import pytest

from broker.frames import RateLimiter, decode_frame
from core import wire
from core.errors import LimitExceeded, ProtocolError

LIMITS = wire.Limits(max_frame_bytes=4096, max_batch_events=3, max_event_bytes=100)
COMMAND = uuid.UUID(int=1)


def event_json(**fields: object) -> dict[str, object]:
    event: dict[str, object] = {
        "command_id": str(COMMAND),
        "kind": "output",
        "id": str(uuid.uuid4()),
        "sequence": 1,
        "stream": "stdout",
        "data": "aGVsbG8=",
    }
    event.update(fields)
    return {key: value for key, value in event.items() if value is not None}


def frame(message: dict[str, object]) -> bytes:
    return json.dumps(message).encode()


def test_a_good_batch_decodes_to_pending_events() -> None:
    """Every field of a valid event reaches the writer, data decoded from base64."""
    decoded = decode_frame(frame({"type": "events", "events": [event_json()]}), LIMITS)

    assert decoded.refused == []
    assert decoded.received_events == 1
    [event] = decoded.events
    assert (event.command_id, event.sequence, event.data) == (COMMAND, 1, b"hello")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "malformed"),
        (b'{"type": "telemetry"}', "unknown_type"),
        (b"[1, 2]", "invalid"),
        (b'{"type": "events", "events": 7}', "invalid"),
        (b"x" * 5000, "frame_too_large"),
    ],
)
def test_whole_frames_are_refused_with_a_code(raw: bytes, code: str) -> None:
    """Bad JSON, unknown types, wrong shapes and oversized frames are refused whole."""
    with pytest.raises(ProtocolError) as refused:
        decode_frame(raw, LIMITS)
    assert refused.value.code == code


def test_a_batch_over_the_limit_names_the_limit() -> None:
    """More events than max_batch_events is refused, naming the setting."""
    events = [event_json(sequence=n) for n in range(1, 5)]
    with pytest.raises(LimitExceeded) as refused:
        decode_frame(frame({"type": "events", "events": events}), LIMITS)
    assert refused.value.code == "batch_too_large"
    assert "max_batch_events" in refused.value.reason


def test_bad_events_are_refused_one_by_one() -> None:
    """A wrong field type or value refuses that event only, naming it by id."""
    good = event_json(sequence=1)
    wrong_type = event_json(sequence="two")
    too_big = event_json(sequence=3, data="QUFB" * 40)
    decoded = decode_frame(
        frame({"type": "events", "events": [good, wrong_type, too_big]}), LIMITS
    )

    assert [event.sequence for event in decoded.events] == [1]
    codes = {str(refused.id): refused.code for refused in decoded.refused}
    assert codes == {wrong_type["id"]: "invalid", too_big["id"]: "too_large"}
    assert "max_event_bytes" in decoded.refused[1].reason


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "chatter"},
        {"stream": None},
        {"kind": "status", "stream": "stdout"},
        {"sequence": 0},
        {"payload": {"text": "nul \u0000 inside"}},
        {"emitted_at": -5.0},
    ],
)
def test_events_breaking_the_rules_are_refused(fields: dict[str, object]) -> None:
    """Unknown kinds, missing streams, bad sequences, NUL in payloads are refused."""
    bad = event_json(**fields)
    if "stream" in fields and fields["stream"] is None:
        bad.pop("stream", None)
    decoded = decode_frame(frame({"type": "events", "events": [bad]}), LIMITS)

    assert decoded.events == []
    assert [refused.code for refused in decoded.refused] == ["invalid"]


def test_legacy_event_without_id_or_sequence_is_accepted() -> None:
    """An older runner's single `event` gets an id here and no sequence yet."""
    legacy = event_json(id=None, sequence=None)
    decoded = decode_frame(frame({"type": "event", "event": legacy}), LIMITS)

    [event] = decoded.events
    assert isinstance(event.id, uuid.UUID) and event.sequence is None


def test_rate_limiter_allows_a_second_of_burst_then_refills() -> None:
    """The bucket holds one second of events and refills with time."""
    now = [0.0]
    limiter = RateLimiter(100, clock=lambda: now[0])

    assert limiter.try_take(100)
    assert not limiter.try_take(1)
    now[0] = 0.5
    assert limiter.try_take(50)
    assert not limiter.try_take(1)
