"""The broker's handshake, hello, HTTP endpoints, fencing and dispatch."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from broker.relay_settings import RelaySettings
from broker.server import BrokerServer
from core.commands import request_cancel
from tests.broker.conftest import RunnerWithCommand, StartBroker
from tests.broker.wire_client import WireRunner, output_event, poll_until
from tests.conftest import create_command, register_runner
from tests.core.test_retention import delivered_command


async def test_hello_names_the_runner_epoch_and_limits(
    broker: BrokerServer, pool: asyncpg.Pool
) -> None:
    """After the upgrade the broker sends hello with the raised connection epoch."""
    registered = await register_runner(pool, "alpha")

    first = await WireRunner.connect(broker.url, registered.token)
    await first.close()
    second = await WireRunner.connect(broker.url, registered.token)

    assert second.hello.runner_id == registered.id
    assert second.hello.runner_name == "alpha"
    assert second.hello.connection_epoch == first.hello.connection_epoch + 1
    assert second.hello.limits.max_frame_bytes == 1024 * 1024
    stored_epoch = await pool.fetchval(
        "SELECT connection_epoch FROM runners WHERE id = $1", registered.id
    )
    assert stored_epoch == second.hello.connection_epoch
    await second.close()


@pytest.mark.parametrize(
    "header",
    [None, "Bearer rlr_not-a-real-token", "Basic dXNlcjpwYXNz"],
)
async def test_bad_token_is_refused_at_the_upgrade(
    broker: BrokerServer, pool: asyncpg.Pool, header: str | None
) -> None:
    """A missing, unknown or non-bearer token gets 401 with a body saying why."""
    await register_runner(pool, "alpha")
    headers = {} if header is None else {"Authorization": header}

    with pytest.raises(InvalidStatus) as refused:
        async with asyncio.timeout(10):
            await connect(broker.url, additional_headers=headers)

    response = refused.value.response
    assert response.status_code == 401
    assert b"token" in response.body


async def test_revoked_token_is_refused(
    broker: BrokerServer, pool: asyncpg.Pool
) -> None:
    """A revoked runner cannot connect."""
    registered = await register_runner(pool, "alpha")
    await pool.execute(
        "UPDATE runners SET revoked_at = now() WHERE id = $1", registered.id
    )

    with pytest.raises(InvalidStatus) as refused:
        await WireRunner.connect(broker.url, registered.token)
    assert refused.value.response.status_code == 401
    assert b"revoked" in refused.value.response.body


async def test_connected_runners_are_marked_seen_while_connected(
    start_broker: StartBroker, pool: asyncpg.Pool
) -> None:
    """last_seen_at keeps moving while a runner stays connected, idle or not."""
    broker = await start_broker(seen_interval=0.2)
    registered = await register_runner(pool, "alpha")
    runner = await WireRunner.connect(broker.url, registered.token)
    try:
        connected_at = await pool.fetchval(
            "SELECT connected_at FROM runners WHERE id = $1", registered.id
        )
        async with asyncio.timeout(20):
            while True:
                last_seen = await pool.fetchval(
                    "SELECT last_seen_at FROM runners WHERE id = $1", registered.id
                )
                if last_seen > connected_at:
                    break
                await asyncio.sleep(0.1)
    finally:
        await runner.close()


async def test_the_broker_prunes_on_a_schedule_when_asked(
    start_broker: StartBroker, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With run_retention, old finished and delivered commands are pruned."""
    monkeypatch.setenv("RUNLEDGER_RETENTION_INTERVAL", "0.2")
    old = await delivered_command(pool, events=5, age=timedelta(days=60))
    recent = await delivered_command(pool, events=5, age=timedelta(days=1))

    await start_broker(run_retention=True)

    async def old_events_gone() -> bool:
        remaining = await pool.fetchval(
            "SELECT count(*) FROM events WHERE command_id = $1", old
        )
        return bool(remaining == 0)

    await poll_until(old_events_gone)
    assert (
        await pool.fetchval("SELECT count(*) FROM events WHERE command_id = $1", recent)
        == 5
    )


async def test_metrics_and_healthz_answer_plain_http(broker: BrokerServer) -> None:
    """GET /metrics serves Prometheus text and /healthz says ok, on the same port."""
    base = f"http://127.0.0.1:{broker.port}"
    async with httpx.AsyncClient(timeout=10) as client:
        metrics = await client.get(f"{base}/metrics")
        health = await client.get(f"{base}/healthz")

    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "runledger_broker_events_stored_total" in metrics.text
    assert "runledger_broker_acknowledge_latency_seconds_bucket" in metrics.text
    assert health.status_code == 200
    assert health.text == "ok\n"


async def test_queued_commands_are_dispatched_on_connect(
    broker: BrokerServer, pool: asyncpg.Pool
) -> None:
    """The catch-up scan sends commands queued while the runner was away."""
    registered = await register_runner(pool, "alpha")
    first = await create_command(pool, registered.id, ["echo", "one"])
    second = await create_command(pool, registered.id, ["echo", "two"])

    runner = await WireRunner.connect(broker.url, registered.token)
    await runner.receive_until(lambda r: len(r.commands) == 2)

    assert [c.command_id for c in runner.commands] == [first, second]
    assert runner.commands[0].argv == ["echo", "one"]
    rows = await pool.fetch(
        "SELECT status, dispatched_at FROM commands WHERE runner_id = $1", registered.id
    )
    assert all(r["status"] == "dispatched" and r["dispatched_at"] for r in rows)
    await runner.close()


async def test_a_command_without_events_is_sent_again_on_reconnect(
    broker: BrokerServer, alpha: RunnerWithCommand
) -> None:
    """A command sent on a connection that died before any event is resent."""
    first = await WireRunner.connect(broker.url, alpha.token)
    await first.receive_until(lambda r: len(r.commands) == 1)
    first.connection.transport.abort()

    second = await WireRunner.connect(broker.url, alpha.token)
    await second.receive_until(lambda r: len(r.commands) == 1)
    assert second.commands[0].command_id == alpha.command_id

    events = [output_event(alpha.command_id, 1, b"started")]
    await second.send_events(events)
    await second.wait_settled(events)
    await second.close()
    third = await WireRunner.connect(broker.url, alpha.token)
    await third.send_events(events)
    await third.wait_settled(events)
    assert third.commands == []
    await third.close()


async def test_new_commands_and_cancels_reach_a_connected_runner(
    broker: BrokerServer, pool: asyncpg.Pool
) -> None:
    """NOTIFY on runledger_commands brings new commands and cancel requests at once."""
    registered = await register_runner(pool, "alpha")
    runner = await WireRunner.connect(broker.url, registered.token)

    command_id = await create_command(pool, registered.id, ["sleep", "60"])
    await runner.receive_until(lambda r: len(r.commands) == 1)
    assert runner.commands[0].command_id == command_id

    async with pool.acquire() as connection:
        assert await request_cancel(connection, command_id)
    await runner.receive_until(lambda r: len(r.cancels) == 1)
    assert runner.cancels[0].command_id == command_id
    await runner.close()


async def test_second_connection_fences_the_first(
    broker: BrokerServer, pool: asyncpg.Pool, alpha: RunnerWithCommand
) -> None:
    """A newer connection of the same runner closes the older one."""
    command_id = alpha.command_id
    older = await WireRunner.connect(broker.url, alpha.token)
    newer = await WireRunner.connect(broker.url, alpha.token)

    await older.wait_closed()
    assert older.connection.close_code == 4001

    events = [output_event(command_id, 1, b"from the newer connection")]
    await newer.send_events(events)
    await newer.wait_settled(events)
    assert (command_id, 1) in newer.acknowledged
    await newer.close()


async def test_fenced_writes_are_refused_across_brokers(
    start_broker: StartBroker, pool: asyncpg.Pool, alpha: RunnerWithCommand
) -> None:
    """A connection fenced by another broker gets its writes refused, not stored."""
    first_broker = await start_broker()
    second_broker = await start_broker()
    command_id = alpha.command_id

    older = await WireRunner.connect(first_broker.url, alpha.token)
    newer = await WireRunner.connect(second_broker.url, alpha.token)
    assert newer.hello.connection_epoch > older.hello.connection_epoch

    stale = output_event(command_id, 1, b"stale")
    await older.send_events([stale])
    await older.wait_closed()
    assert [e.code for e in older.errors] == ["fenced"]
    assert not older.acknowledged
    stored = await pool.fetchval("SELECT count(*) FROM events")
    assert stored == 0
    refused = await pool.fetchval(
        "SELECT count(*) FROM refused_events WHERE code = 'fenced' AND event_id = $1",
        str(stale.id),
    )
    assert refused == 1
    await newer.close()


async def test_relay_runs_in_the_broker_process(
    start_broker: StartBroker, pool: asyncpg.Pool, alpha: RunnerWithCommand
) -> None:
    """With run_relay the stored events reach the sink and /metrics shows the relay."""
    bodies: asyncio.Queue[bytes] = asyncio.Queue()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        bodies.put_nowait(await reader.readexactly(length))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    sink_server = await asyncio.start_server(sink, "127.0.0.1", 0)
    sink_port = sink_server.sockets[0].getsockname()[1]
    relay_settings = RelaySettings(
        sink_url=f"http://127.0.0.1:{sink_port}/api/runner/events",
        signing_secret="test-signing-secret",
    )
    broker = await start_broker(run_relay=True, relay_settings=relay_settings)
    command_id = alpha.command_id
    runner = await WireRunner.connect(broker.url, alpha.token)

    events = [output_event(command_id, 1, b"to the sink")]
    await runner.send_events(events)
    await runner.wait_settled(events)

    body = await asyncio.wait_for(bodies.get(), 30)
    assert str(events[0].id) in body.decode()
    async with httpx.AsyncClient(timeout=10) as client:
        page = await client.get(f"http://127.0.0.1:{broker.port}/metrics")
    assert "runledger_relay_deliveries" in page.text
    await runner.close()
    sink_server.close()
