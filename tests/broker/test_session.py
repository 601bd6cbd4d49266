"""A runner's connection: limits and bad frames answered, the session carrying on."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import uuid
from pathlib import Path

import asyncpg
import pytest
from websockets.exceptions import InvalidStatus

from broker import metrics
from broker.server import BrokerServer
from core import wire
from tests.broker.conftest import RunnerWithCommand, StartBroker
from tests.broker.wire_client import WireRunner, output_event
from tests.conftest import create_command, register_runner


async def connected_runner(
    broker: BrokerServer, pool: asyncpg.Pool, name: str = "alpha"
) -> tuple[WireRunner, uuid.UUID]:
    """A registered runner connected to ``broker``, and one command of it."""
    registered = await register_runner(pool, name)
    command_id = await create_command(pool, registered.id, ["true"])
    runner = await WireRunner.connect(broker.url, registered.token)
    await runner.receive_until(lambda r: len(r.commands) == 1)
    return runner, command_id


async def deliver(runner: WireRunner, command_id: uuid.UUID, sequence: int) -> None:
    """Send one event and wait until it is acknowledged."""
    event = output_event(command_id, sequence, b"still delivering")
    await runner.send_events([event])
    await runner.wait_settled([event])
    assert runner.acknowledged[(command_id, sequence)] == event.id


async def test_oversized_and_malformed_frames_are_refused_and_the_session_goes_on(
    broker: BrokerServer, pool: asyncpg.Pool
) -> None:
    """Each bad frame gets an error naming the fault; the connection delivers on."""
    runner, command_id = await connected_runner(broker, pool)
    await deliver(runner, command_id, 1)

    oversized = output_event(command_id, 2, b"x" * (1024 * 1024))
    await runner.send_events([oversized])
    await runner.receive_until(lambda r: len(r.errors) == 1)
    await deliver(runner, command_id, 2)

    await runner.send_raw('{"type": "events", "events": [')
    await runner.send_raw('{"type": "telemetry", "cpu": 3}')
    await runner.send_raw(b'{"type": "events", "events": {"not": "a list"}}')
    await runner.receive_until(lambda r: len(r.errors) == 4)
    await deliver(runner, command_id, 3)

    codes = [error.code for error in runner.errors]
    assert codes == ["frame_too_large", "malformed", "unknown_type", "invalid"]
    assert "max_frame_bytes" in runner.errors[0].reason
    stored = await pool.fetch(
        "SELECT sequence, data FROM events WHERE command_id = $1 ORDER BY sequence",
        command_id,
    )
    assert [(r["sequence"], bytes(r["data"])) for r in stored] == [
        (n, b"still delivering") for n in (1, 2, 3)
    ]
    await runner.close()


async def test_wrong_field_types_refuse_only_that_event(
    broker: BrokerServer, pool: asyncpg.Pool
) -> None:
    """An event with a wrong field type is refused by id; its neighbours are stored."""
    runner, command_id = await connected_runner(broker, pool)
    good = output_event(command_id, 1, b"good")
    bad_id = str(uuid.uuid4())
    message = json.loads(wire.encode(wire.EventsMessage(events=[good])))
    message["events"].append(
        {"command_id": str(command_id), "kind": "output", "id": bad_id, "sequence": "2"}
    )
    await runner.send_raw(json.dumps(message))
    await runner.receive_until(lambda r: bool(r.refused) and bool(r.acknowledged))

    assert runner.acknowledged == {(command_id, 1): good.id}
    assert [(str(r.id), r.code) for r in runner.refused] == [(bad_id, "invalid")]
    recorded = await pool.fetchval(
        "SELECT count(*) FROM refused_events WHERE event_id = $1", bad_id
    )
    assert recorded == 1
    await runner.close()


async def test_event_and_batch_limits_are_named(
    start_broker: StartBroker, pool: asyncpg.Pool
) -> None:
    """Events over max_event_bytes are refused; batches over max_batch_events too."""
    broker = await start_broker(max_event_bytes=1000, max_batch_events=5)
    runner, command_id = await connected_runner(broker, pool)
    assert runner.hello.limits.max_event_bytes == 1000

    big = output_event(command_id, 1, b"y" * 1001)
    await runner.send_events([big])
    await runner.wait_settled([big])
    assert runner.refused[0].code == "too_large"
    assert "max_event_bytes" in runner.refused[0].reason

    await runner.send_events([output_event(command_id, n, b"z") for n in range(1, 7)])
    await runner.receive_until(lambda r: len(r.errors) == 1)
    assert runner.errors[0].code == "batch_too_large"
    assert "max_batch_events" in runner.errors[0].reason
    await deliver(runner, command_id, 1)
    await runner.close()


async def test_events_per_second_limit_refuses_the_frame(
    start_broker: StartBroker, pool: asyncpg.Pool
) -> None:
    """Frames over the rate get a rate_limited error and may be resent later."""
    broker = await start_broker(max_events_per_second=10, max_batch_events=10)
    runner, command_id = await connected_runner(broker, pool)

    burst = [output_event(command_id, n, b"b") for n in range(1, 11)]
    await runner.send_events(burst)
    await runner.wait_settled(burst)
    over = [output_event(command_id, 11, b"o")]
    await runner.send_events(over)
    await runner.receive_until(lambda r: len(r.errors) == 1)

    assert runner.errors[0].code == "rate_limited"
    assert "max_events_per_second" in runner.errors[0].reason
    await asyncio.sleep(0.3)
    await runner.send_events(over)
    await runner.wait_settled(over)
    assert (command_id, 11) in runner.acknowledged
    await runner.close()


async def test_connections_per_runner_limit_refuses_the_upgrade(
    start_broker: StartBroker, pool: asyncpg.Pool
) -> None:
    """Past max_connections_per_runner the upgrade gets 429 naming the limit."""
    broker = await start_broker(max_connections_per_runner=1)
    registered = await register_runner(pool, "alpha")
    first = await WireRunner.connect(broker.url, registered.token)

    with pytest.raises(InvalidStatus) as refused:
        await WireRunner.connect(broker.url, registered.token)

    assert refused.value.response.status_code == 429
    assert b"max_connections_per_runner=1" in refused.value.response.body
    await first.close()


@pytest.fixture
def self_signed_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command."""
    certificate, key = tmp_path / "broker.pem", tmp_path / "broker.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(certificate), "-days", "1",
            "-subj", "/CN=runledger test broker",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return certificate, key


async def test_tls_broker_is_verified_with_a_ca_bundle(
    start_broker: StartBroker,
    alpha: RunnerWithCommand,
    self_signed_certificate: tuple[Path, Path],
) -> None:
    """The broker serves wss://; a client trusting the certificate delivers events."""
    certificate, key = self_signed_certificate
    broker = await start_broker(tls_cert=certificate, tls_key=key)
    assert broker.url.startswith("wss://")
    command_id = alpha.command_id

    untrusting = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        await WireRunner.connect(broker.url, alpha.token, ssl_context=untrusting)

    trusting = ssl.create_default_context(cafile=str(certificate))
    runner = await WireRunner.connect(broker.url, alpha.token, ssl_context=trusting)
    await deliver(runner, command_id, 1)
    await runner.close()


async def test_slow_postgres_stops_the_broker_reading(
    start_broker: StartBroker, pool: asyncpg.Pool
) -> None:
    """While commits are blocked the broker reads only what its bounds let it hold."""
    broker = await start_broker(
        commit_max_events=8, ingest_queue_frames=4, session_frames_in_flight=200
    )
    runner, command_id = await connected_runner(broker, pool)
    frames = [output_event(command_id, n, b"w" * 1000) for n in range(1, 201)]
    received_before = metrics.EVENTS_RECEIVED._value.get()

    # Holding the runner's row stalls every commit of its events.
    async with pool.acquire() as blocker:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute(
            "SELECT 1 FROM runners WHERE id = $1 FOR UPDATE", runner.hello.runner_id
        )
        sending = asyncio.gather(*(runner.send_events([e]) for e in frames))
        await asyncio.sleep(1.0)
        read_while_blocked = metrics.EVENTS_RECEIVED._value.get() - received_before
        await transaction.rollback()

    await sending
    await runner.wait_settled(frames)
    # Transactions in flight, frames held back behind them, a full queue,
    # and the frame waiting to join it: events here are one per frame.
    settings = broker.settings
    bound = (
        settings.commits_in_flight * settings.commit_max_events
        + 2 * settings.ingest_queue_frames
        + 1
    )
    assert read_while_blocked <= bound
    assert len(runner.acknowledged) == 200
    await runner.close()


async def test_listener_comes_back_after_losing_its_connection(
    broker: BrokerServer, pool: asyncpg.Pool
) -> None:
    """A killed LISTEN connection is re-established and commands still arrive."""
    runner, _ = await connected_runner(broker, pool)
    killed = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
    )
    assert killed == 1

    command_id = await create_command(pool, runner.hello.runner_id, ["echo", "late"])
    await runner.receive_until(lambda r: len(r.commands) == 2)
    assert runner.commands[1].command_id == command_id
    await runner.close()
