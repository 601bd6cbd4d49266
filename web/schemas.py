"""The JSON shapes of the web tier's API, documented through OpenAPI.

Event data is bytes and travels as base64 (``data``), so a client gets
exactly what the child wrote; ``text`` is the same bytes decoded as UTF-8
with replacement characters, a convenience for people, never for checks.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec


def _doc(description: str) -> msgspec.Meta:
    return msgspec.Meta(description=description)


Base64Bytes = Annotated[
    bytes,
    msgspec.Meta(
        description="the event's data, exactly as the child wrote it, in base64",
        extra_json_schema={"contentEncoding": "base64"},
    ),
]
ConvenienceText = Annotated[
    str,
    msgspec.Meta(
        description="data decoded as UTF-8 with replacement characters; for "
        "display only, use data for anything exact"
    ),
]


class EventOut(msgspec.Struct):
    """One stored event."""

    sequence: int
    id: uuid.UUID
    kind: str
    stream: str | None
    data: Base64Bytes
    text: ConvenienceText
    payload: dict[str, Any] | None
    emitted_at: datetime | None
    stored_at: datetime


class GapOut(msgspec.Struct):
    """An inclusive range of sequences that are not stored.

    ``recorded`` gaps were given up on by the relay (it waited, recorded them
    and moved on); the others are holes below a stored sequence that may
    still be filled (an event in flight or a transaction not yet committed).
    """

    first: int
    last: int
    recorded: bool
    label: str


class EventsPage(msgspec.Struct):
    """A gap-aware page of a command's log.

    ``events`` are exactly the sequences ``after + 1 .. contiguous_through``:
    a page never skips a sequence. ``next_after`` is the cursor for the next
    request (equal to ``contiguous_through``). ``waiting_for`` is the missing
    sequence the page stopped at, when a later one is stored; ``more`` says the
    page was cut by ``limit``. ``gaps`` lists the known missing ranges below
    ``highest_stored``. ``finished`` is true once the exit event is stored.
    """

    command_id: uuid.UUID
    after: int
    events: list[EventOut]
    next_after: Annotated[int, _doc("pass as ?after= to read on")]
    contiguous_through: Annotated[
        int, _doc("every sequence from after + 1 through this is in events")
    ]
    highest_stored: Annotated[int, _doc("the highest sequence stored so far")]
    more: Annotated[bool, _doc("the page was cut by limit; read on at once")]
    waiting_for: Annotated[
        int | None, _doc("the missing sequence the page stopped at, if any")
    ]
    gaps: Annotated[list[GapOut], _doc("known missing ranges below highest_stored")]
    finished: Annotated[bool, _doc("the command's exit event is stored")]
    status: Annotated[str, _doc("the command's summary status")]


class StreamFigures(msgspec.Struct):
    """Byte count and SHA-256 (hex) of one stream."""

    bytes: int
    sha256: str


class StreamVerification(msgspec.Struct):
    """What the child wrote on one stream, against what is stored."""

    expected: StreamFigures | None
    stored: StreamFigures
    matched: bool | None


class CommandSummary(msgspec.Struct):
    """A command as the lists show it."""

    id: uuid.UUID
    runner_id: uuid.UUID
    runner_name: str
    argv: list[str]
    status: str
    exit_code: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    last_activity_at: datetime | None
    duration_seconds: float | None
    verification_matched: bool | None


class CommandDetail(msgspec.Struct):
    """A command with its summary, relay state and end-to-end verification."""

    id: uuid.UUID
    runner_id: uuid.UUID
    runner_name: str
    argv: list[str]
    cwd: str | None
    env: dict[str, str]
    status: str
    exit_code: int | None
    created_at: datetime
    dispatched_at: datetime | None
    cancel_requested_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    last_activity_at: datetime | None
    duration_seconds: float | None
    applied_through: int
    delivery_state: str | None
    delivered_through: int | None
    delivery_error: str | None
    verification: dict[str, StreamVerification] | None
    verification_matched: bool | None


class RunnerOut(msgspec.Struct):
    """A runner, whether it is connected, and what it runs now."""

    id: uuid.UUID
    name: str
    connected: bool
    revoked: bool
    created_at: datetime
    last_seen_at: datetime | None
    connected_at: datetime | None
    disconnected_at: datetime | None
    current_command_id: uuid.UUID | None
    current_command_argv: list[str] | None
    current_command_status: str | None


class SubmitCommand(msgspec.Struct, forbid_unknown_fields=True):
    """A command to run: the runner by ``runner`` name or ``runner_id``.

    Both may be left out when exactly one runner exists.
    """

    argv: list[str]
    runner: str | None = None
    runner_id: uuid.UUID | None = None
    cwd: str | None = None
    env: dict[str, str] = {}


class Submitted(msgspec.Struct):
    """The id of a command just stored, and where to follow it."""

    id: uuid.UUID
    url: str
    events_url: str


class CancelResult(msgspec.Struct):
    """Whether a cancel was requested (false once the command has finished)."""

    id: uuid.UUID
    cancel_requested: bool


class IngestResult(msgspec.Struct):
    """What a delivery changed; ``duplicate`` when it had been applied before."""

    delivery_id: str
    command_id: uuid.UUID
    applied: int
    duplicate: bool


class ReplayResult(msgspec.Struct):
    """Whether a dead command's delivery was set going again."""

    command_id: uuid.UUID
    replayed: bool
