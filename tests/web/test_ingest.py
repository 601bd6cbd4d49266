"""The relay's sink: signatures, staleness, idempotency, summary and verification."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from core import signing
from core.delivery import DeliveredEvent, DeliveryBatch, delivery_id_for, encode
from core.errors import ProtocolError
from tests.web.conftest import SIGNING_SECRET, StoredCommand, exit_payload, insert_event
from web.ingest import decode_delivery


def _batch(
    command_id: uuid.UUID, events: list[DeliveredEvent], late: bool = False
) -> DeliveryBatch:
    first, last = events[0].sequence, events[-1].sequence
    return DeliveryBatch(
        delivery_id_for(command_id, first, last), command_id, events, late
    )


def _event(
    command_id: uuid.UUID, sequence: int, kind: str = "output", **fields: object
) -> DeliveredEvent:
    return DeliveredEvent(
        id=uuid.uuid4(),
        command_id=command_id,
        sequence=sequence,
        kind=kind,
        emitted_at=datetime.now(UTC),
        **fields,  # type: ignore[arg-type]
    )


async def _post(
    client: httpx.AsyncClient,
    body: bytes,
    delivery_id: str,
    secret: str = SIGNING_SECRET,
    timestamp: int | None = None,
) -> httpx.Response:
    headers = signing.sign(secret.encode(), delivery_id, body, timestamp)
    headers["content-type"] = "application/json"
    return await client.post("/api/runner/events", content=body, headers=headers)


async def _deliver(client: httpx.AsyncClient, batch: DeliveryBatch) -> httpx.Response:
    return await _post(client, encode(batch), batch.delivery_id)


async def test_unsigned_delivery_is_refused(
    client: httpx.AsyncClient, stored_command: StoredCommand
) -> None:
    """A body without signature headers is answered 401 and changes nothing."""
    batch = _batch(
        stored_command.command_id,
        [_event(stored_command.command_id, 1, "status", payload={"status": "running"})],
    )
    response = await client.post("/api/runner/events", content=encode(batch))
    assert response.status_code == 401
    assert "signature headers" in response.json()["detail"]


async def test_wrong_secret_is_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """A delivery signed with another secret is answered 401 and not applied."""
    command_id = stored_command.command_id
    batch = _batch(
        command_id, [_event(command_id, 1, "status", payload={"status": "running"})]
    )
    response = await _post(client, encode(batch), batch.delivery_id, secret="other")
    assert response.status_code == 401
    assert "does not match" in response.json()["detail"]
    assert (
        await pool.fetchval("SELECT status FROM commands WHERE id = $1", command_id)
        == "queued"
    )


async def test_tampered_body_is_refused(
    client: httpx.AsyncClient, stored_command: StoredCommand
) -> None:
    """A body changed after signing does not verify."""
    command_id = stored_command.command_id
    batch = _batch(
        command_id, [_event(command_id, 1, "status", payload={"status": "running"})]
    )
    headers = signing.sign(SIGNING_SECRET.encode(), batch.delivery_id, encode(batch))
    tampered = encode(batch).replace(b"running", b"runnin ")
    response = await client.post(
        "/api/runner/events", content=tampered, headers=headers
    )
    assert response.status_code == 401


async def test_stale_timestamp_is_refused(
    client: httpx.AsyncClient, stored_command: StoredCommand
) -> None:
    """A correctly signed delivery from ten minutes ago is refused as a replay."""
    command_id = stored_command.command_id
    batch = _batch(
        command_id, [_event(command_id, 1, "status", payload={"status": "running"})]
    )
    response = await _post(
        client, encode(batch), batch.delivery_id, timestamp=int(time.time()) - 600
    )
    assert response.status_code == 401
    assert "tolerance" in response.json()["detail"]


async def test_status_event_marks_running(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """The status event moves a queued command to running with a start time."""
    command_id = stored_command.command_id
    batch = _batch(
        command_id,
        [_event(command_id, 1, "status", payload={"status": "running", "pid": 7})],
    )
    response = await _deliver(client, batch)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "delivery_id": batch.delivery_id,
        "command_id": str(command_id),
        "applied": 1,
        "duplicate": False,
    }
    row = await pool.fetchrow("SELECT * FROM commands WHERE id = $1", command_id)
    assert row["status"] == "running"
    assert row["started_at"] is not None
    assert row["last_activity_at"] is not None
    assert row["applied_through"] == 1


async def test_same_delivery_twice_is_applied_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """A retried delivery (same id) answers 200 as a duplicate and changes nothing."""
    command_id = stored_command.command_id
    batch = _batch(
        command_id, [_event(command_id, 1, "status", payload={"status": "running"})]
    )
    first = await _deliver(client, batch)
    before = await pool.fetchrow("SELECT * FROM commands WHERE id = $1", command_id)
    second = await _deliver(client, batch)
    after = await pool.fetchrow("SELECT * FROM commands WHERE id = $1", command_id)

    assert first.json()["duplicate"] is False
    assert second.status_code == 200
    assert second.json()["duplicate"] is True
    assert second.json()["applied"] == 0
    assert dict(before) == dict(after)
    assert await pool.fetchval("SELECT count(*) FROM applied_deliveries") == 1


async def test_concurrent_retries_of_one_delivery_apply_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """Five copies of one delivery posted at once: one applies, four are duplicates."""
    command_id = stored_command.command_id
    batch = _batch(
        command_id, [_event(command_id, 1, "status", payload={"status": "running"})]
    )
    responses = await asyncio.gather(*(_deliver(client, batch) for _ in range(5)))
    assert [response.status_code for response in responses] == [200] * 5
    duplicates = sorted(response.json()["duplicate"] for response in responses)
    assert duplicates == [False, True, True, True, True]


async def test_exit_event_finishes_and_verifies(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """The exit event sets status, exit code, end time and a matching verification."""
    command_id = stored_command.command_id
    stdout, stderr = b"out \x00\xff\r\n", b"\x1b[31merr\x1b[0m\n"
    await insert_event(
        pool, command_id, 1, kind="status", payload={"status": "running"}
    )
    await insert_event(pool, command_id, 2, stream="stdout", data=stdout[:4])
    await insert_event(pool, command_id, 3, stream="stderr", data=stderr)
    await insert_event(pool, command_id, 4, stream="stdout", data=stdout[4:])
    payload = exit_payload(stdout, stderr, "failed", 3)
    await insert_event(pool, command_id, 5, kind="exit", payload=payload)

    events = [
        _event(command_id, 1, "status", payload={"status": "running"}),
        _event(command_id, 2, stream="stdout", data=stdout[:4]),
        _event(command_id, 3, stream="stderr", data=stderr),
        _event(command_id, 4, stream="stdout", data=stdout[4:]),
        _event(command_id, 5, "exit", payload=payload),
    ]
    response = await _deliver(client, _batch(command_id, events))
    assert response.status_code == 200, response.text

    row = await pool.fetchrow("SELECT * FROM commands WHERE id = $1", command_id)
    assert (row["status"], row["exit_code"]) == ("failed", 3)
    assert row["finished_at"] is not None
    assert row["applied_through"] == 5
    assert row["verification_matched"] is True
    verification = json.loads(row["verification"])
    assert verification["stdout"]["stored"] == payload["streams"]["stdout"]  # type: ignore[index]
    assert verification["stderr"]["expected"] == payload["streams"]["stderr"]  # type: ignore[index]
    assert verification["stdout"]["matched"] is True

    detail = (await client.get(f"/api/commands/{command_id}")).json()
    assert detail["verification_matched"] is True
    assert detail["verification"]["stderr"]["stored"]["bytes"] == len(stderr)


async def test_missing_output_shows_as_mismatch(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """When stored output differs from the runner's figures, verification says so."""
    command_id = stored_command.command_id
    await insert_event(pool, command_id, 1, stream="stdout", data=b"partial")
    payload = exit_payload(b"partial and more", b"")
    await insert_event(pool, command_id, 3, kind="exit", payload=payload)

    response = await _deliver(
        client, _batch(command_id, [_event(command_id, 3, "exit", payload=payload)])
    )
    assert response.status_code == 200
    row = await pool.fetchrow("SELECT * FROM commands WHERE id = $1", command_id)
    assert row["verification_matched"] is False
    verification = json.loads(row["verification"])
    assert verification["stdout"]["matched"] is False
    assert verification["stderr"]["matched"] is True

    # The late event arrives and is delivered flagged late: verified again.
    await pool.execute(
        "UPDATE events SET data = 'partial and more'"
        " WHERE command_id = $1 AND sequence = 1",
        command_id,
    )
    await insert_event(pool, command_id, 2, stream="stdout", data=b"")
    late = _batch(
        command_id, [_event(command_id, 2, stream="stdout", data=b"")], late=True
    )
    assert (await _deliver(client, late)).status_code == 200
    row = await pool.fetchrow("SELECT * FROM commands WHERE id = $1", command_id)
    assert row["verification_matched"] is True
    assert row["applied_through"] == 3


async def test_single_event_delivery_is_accepted(
    client: httpx.AsyncClient, pool: asyncpg.Pool, stored_command: StoredCommand
) -> None:
    """Single-event mode: one DeliveredEvent body, its delivery id in the header."""
    command_id = stored_command.command_id
    event = _event(command_id, 1, "status", payload={"status": "running"})
    delivery_id = delivery_id_for(command_id, 1, 1)
    response = await _post(client, encode(event), delivery_id)
    assert response.status_code == 200, response.text
    assert response.json()["applied"] == 1
    assert (
        await pool.fetchval("SELECT status FROM commands WHERE id = $1", command_id)
        == "running"
    )


async def test_unknown_command_is_refused(client: httpx.AsyncClient) -> None:
    """A delivery for a command that is not stored is answered 422."""
    command_id = uuid.uuid4()
    response = await _deliver(
        client, _batch(command_id, [_event(command_id, 1, "status")])
    )
    assert response.status_code == 422


async def test_malformed_body_is_400(client: httpx.AsyncClient) -> None:
    """A signed body that is not a delivery is answered 400, a permanent refusal."""
    response = await _post(client, b'{"events": "nope"}', "d-1")
    assert response.status_code == 400


def test_decode_refuses_mixed_commands() -> None:
    """A batch whose events belong to another command than the batch is malformed."""
    command_id = uuid.uuid4()
    batch = DeliveryBatch("d", command_id, [_event(uuid.uuid4(), 1)])
    with pytest.raises(ProtocolError):
        decode_delivery(encode(batch), "d")


def test_decode_refuses_another_delivery_id() -> None:
    """The body's delivery id must be the signed one, so ids cannot be swapped."""
    command_id = uuid.uuid4()
    batch = DeliveryBatch("d-1", command_id, [_event(command_id, 1)])
    with pytest.raises(ProtocolError):
        decode_delivery(encode(batch), "d-2")
