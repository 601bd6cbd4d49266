"""``runledger relay``: dead letters, replay, standalone relays in real processes."""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

from broker import relay_cli
from tests.broker.relay_harness import (
    SECRET,
    Answer,
    new_command,
    running_relay,
    running_sink,
    store_events,
    wait_for_state,
    wait_until,
)

REPOSITORY = Path(__file__).resolve().parents[2]


async def run_cli(*argv: str) -> int:
    """Run a relay subcommand's handler in a thread (it runs its own event loop).

    ``relay_cli.main`` is not used here: it configures logging for a process.
    """
    parser = argparse.ArgumentParser()
    relay_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    code: int = await asyncio.to_thread(args.handler, args)
    return code


async def test_dead_lists_parked_commands_and_replay_delivers_them(
    database_url: str,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A command parked by a 4xx is listed with its error; replay resends the
    same delivery, under the same id, once the sink accepts it."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    command_id = await new_command(pool)
    refusing = True

    async with running_sink() as sink:

        async def refuse_until_fixed(_number: int, _delivery_id: str) -> Answer:
            return Answer(422, body=b"payload too new") if refusing else Answer()

        sink.behaviour = refuse_until_fixed
        async with running_relay(database_url, sink):
            await store_events(pool, command_id, range(1, 6))
            await wait_for_state(pool, command_id, "dead")
            # Events stored after the failure wait behind the dead delivery.
            await store_events(pool, command_id, range(6, 9))

            assert await run_cli("relay", "dead") == 0
            listed = capsys.readouterr().out
            assert str(command_id) in listed
            assert "status 422" in listed
            assert "sink answered 422: payload too new" in listed

            refusing = False
            assert await run_cli("relay", "replay", str(command_id)) == 0
            assert "replayed 1 command(s)" in capsys.readouterr().out
            await wait_until(lambda: len(sink.applied) == 8, within=30)

            assert await run_cli("relay", "dead") == 0
            assert "no dead commands" in capsys.readouterr().out

    assert sink.applied_sequences(command_id) == list(range(1, 9))
    assert sink.requests[1].delivery_id == sink.requests[0].delivery_id


async def test_replay_of_a_command_that_is_not_dead_fails(
    database_url: str,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Replaying a live command says so and exits 1; --all with none dead is fine."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    command_id = await new_command(pool)

    assert await run_cli("relay", "replay", str(command_id)) == 1
    assert "is not dead" in capsys.readouterr().err
    assert await run_cli("relay", "replay", "--all") == 0
    assert "replayed 0 command(s)" in capsys.readouterr().out


def _start_relay_process(
    database_url: str, sink_url: str, metrics_port: int = 0
) -> subprocess.Popen[bytes]:
    environment = dict(os.environ)
    environment.update(
        DATABASE_URL=database_url,
        RUNLEDGER_SIGNING_SECRET=SECRET,
        RUNLEDGER_LOG_LEVEL="WARNING",
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker.relay_cli",
            "relay",
            "--sink-url",
            sink_url,
            "--workers",
            "3",
            "--scan-interval",
            "0.5",
            "--metrics-port",
            str(metrics_port),
            "--batch-max-events",
            "20",
        ],
        cwd=REPOSITORY,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _stop(process: subprocess.Popen[bytes]) -> bytes:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, errors = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        _, errors = process.communicate(timeout=5)
    return errors


@pytest.mark.slow
async def test_two_relay_processes_deliver_everything_exactly_once(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """Two standalone relays on one database share the work; the sink receives
    every event once, in order per command, and no delivery twice."""
    command_ids = [await new_command(pool) for _ in range(8)]
    lease_holders: set[str] = set()

    async with running_sink() as sink:

        async def jittery(_number: int, _delivery_id: str) -> Answer:
            await asyncio.sleep(random.uniform(0.0, 0.02))
            return Answer()

        sink.behaviour = jittery
        processes = [_start_relay_process(database_url, sink.url) for _ in range(2)]
        try:
            # Both relays are up before any work exists, so both can get some.
            for process in processes:
                assert process.stdout is not None
                ready = await asyncio.to_thread(process.stdout.readline)
                assert b"relay: forwarding" in ready
            for start in range(1, 201, 25):
                for command_id in command_ids:
                    await store_events(pool, command_id, range(start, start + 25))
                holders = await pool.fetch(
                    "SELECT lease_owner FROM command_delivery "
                    "WHERE lease_owner IS NOT NULL"
                )
                lease_holders.update(r["lease_owner"].split("/")[0] for r in holders)
                await asyncio.sleep(0.1)

            while len(sink.applied) < 1600:
                holders = await pool.fetch(
                    "SELECT lease_owner FROM command_delivery "
                    "WHERE lease_owner IS NOT NULL"
                )
                lease_holders.update(r["lease_owner"].split("/")[0] for r in holders)
                assert all(p.poll() is None for p in processes), "a relay exited"
                await asyncio.sleep(0.05)
                assert len(sink.requests) < 10_000
        finally:
            errors = [await asyncio.to_thread(_stop, p) for p in processes]

    for command_id in command_ids:
        assert sink.applied_sequences(command_id) == list(range(1, 201))
    received = [r.delivery_id for r in sink.requests]
    assert len(received) == len(set(received)), "a delivery was sent twice"
    assert sink.duplicates == 0
    assert len(lease_holders) == 2, f"both relays should work: {lease_holders}"
    assert all(p.returncode == 0 for p in processes), errors


async def test_a_standalone_relay_serves_its_metrics(
    database_url: str, pool: asyncpg.Pool, unused_tcp_port: int
) -> None:
    """The standalone relay answers /metrics and /metrics.json on its port."""
    command_id = await new_command(pool)
    await store_events(pool, command_id, range(1, 4))

    async with running_sink() as sink:
        process = _start_relay_process(database_url, sink.url, unused_tcp_port)
        try:
            await wait_until(lambda: len(sink.applied) == 3, within=30)
            async with httpx.AsyncClient() as client:
                base = f"http://127.0.0.1:{unused_tcp_port}"
                # The relay counts a delivery once it has recorded it.
                for _ in range(100):
                    text = (await client.get(base + "/metrics")).text
                    if "runledger_relay_delivered_events_total 3.0" in text:
                        break
                    await asyncio.sleep(0.1)
                summary = (await client.get(base + "/metrics.json")).json()
        finally:
            await asyncio.to_thread(_stop, process)

    assert "forwarding_queue_queued" in text
    assert "runledger_relay_delivered_events_total 3.0" in text
    assert set(summary["forwardingQueue"]) == {"queued", "activeWorkers", "processing"}
