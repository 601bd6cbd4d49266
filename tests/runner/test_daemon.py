"""The runner service end to end against the broker stand-in."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from core import wire
from runner.daemon import Runner
from runner.spool import Spool
from tests.runner.conftest import StandInBroker, runner_settings, sha256

# Awkward output on both streams: invalid UTF-8, NUL, a bare \r, ANSI colour,
# and a long line without a newline that must be split across events.
AWKWARD_PROGRAM = r"""
import sys
out, err = sys.stdout.buffer, sys.stderr.buffer
out.write(b"plain line\n\xff\xfe not utf-8 \x00 nul\r progress 50%\r progress 100%")
err.write(b"\x1b[31mred error\x1b[0m\n\x00\xc3")
out.write(b"x" * 700_000)
err.write(bytes(range(256)) * 1000)
out.flush(); err.flush()
sys.exit(3)
"""


async def run_command(
    broker: StandInBroker, argv: list[str], **fields: object
) -> uuid.UUID:
    command_id = uuid.uuid4()
    await broker.send(wire.CommandMessage(command_id=command_id, argv=argv, **fields))  # type: ignore[arg-type]
    return command_id


async def test_output_reaches_the_broker_byte_for_byte(
    broker: StandInBroker, runner: Runner
) -> None:
    """Both streams arrive exactly as written, numbered 1..n, with the exit last."""
    command_id = await run_command(broker, [sys.executable, "-c", AWKWARD_PROGRAM])
    async with asyncio.timeout(30):
        await runner.wait_acknowledged(command_id)

    expected_stdout = (
        b"plain line\n\xff\xfe not utf-8 \x00 nul\r progress 50%\r progress 100%"
        + b"x" * 700_000
    )
    expected_stderr = b"\x1b[31mred error\x1b[0m\n\x00\xc3" + bytes(range(256)) * 1000
    assert broker.output_of(command_id, "stdout") == expected_stdout
    assert broker.output_of(command_id, "stderr") == expected_stderr

    events = broker.events_of(command_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].kind == "status" and events[0].payload is not None
    assert events[0].payload["status"] == "running"
    assert isinstance(events[0].payload["pid"], int)
    assert events[-1].kind == "exit"
    assert [e.kind for e in events[1:-1]] == ["output"] * (len(events) - 2)

    exit_payload = broker.exit_of(command_id)
    assert exit_payload == {
        "status": "failed",
        "exit_code": 3,
        "reason": None,
        "streams": {
            "stdout": {
                "bytes": len(expected_stdout),
                "sha256": sha256(expected_stdout),
            },
            "stderr": {
                "bytes": len(expected_stderr),
                "sha256": sha256(expected_stderr),
            },
        },
    }
    state = runner.state()
    assert (state.spooled, state.unacknowledged, state.running) == (0, 0, 0)


async def test_output_is_chunked_below_the_broker_event_limit(
    broker: StandInBroker, runner: Runner
) -> None:
    """A 3 MB line is split into events whose base64 fits max_event_bytes."""
    program = "import sys; sys.stdout.buffer.write(b'z' * 3_000_000)"
    command_id = await run_command(broker, [sys.executable, "-c", program])
    async with asyncio.timeout(30):
        await runner.wait_acknowledged(command_id)

    outputs = [e for e in broker.events_of(command_id) if e.kind == "output"]
    assert b"".join(e.data for e in outputs) == b"z" * 3_000_000
    assert len(outputs) >= 3_000_000 // broker.limits.max_event_bytes
    largest_encoded = max(len(wire.encode(e)) for e in outputs)
    assert largest_encoded < broker.limits.max_event_bytes
    assert max(broker.frames) <= broker.limits.max_frame_bytes


async def test_small_writes_are_joined_within_the_time_window(
    broker: StandInBroker, runner: Runner
) -> None:
    """A hundred quick lines make a few events, not one event per line."""
    program = "import sys\nfor i in range(100):\n    print(i, flush=True)"
    command_id = await run_command(broker, [sys.executable, "-c", program])
    async with asyncio.timeout(30):
        await runner.wait_acknowledged(command_id)

    outputs = [e for e in broker.events_of(command_id) if e.kind == "output"]
    expected = "".join(f"{i}\n" for i in range(100)).encode()
    assert broker.output_of(command_id, "stdout") == expected
    assert len(outputs) < 20


async def test_env_and_cwd_are_applied(
    broker: StandInBroker, runner: Runner, tmp_path: Path
) -> None:
    """The command's env is added to the runner's, and it runs in its cwd."""
    program = (
        "import os; print(os.getcwd(), os.environ['RL_TEST'], 'PATH' in os.environ)"
    )
    command_id = await run_command(
        broker,
        [sys.executable, "-c", program],
        cwd=str(tmp_path),
        env={"RL_TEST": "hello"},
    )
    async with asyncio.timeout(30):
        await runner.wait_acknowledged(command_id)
    assert broker.output_of(command_id, "stdout") == f"{tmp_path} hello True\n".encode()
    assert broker.exit_of(command_id)["status"] == "succeeded"  # type: ignore[index]


async def test_a_program_that_cannot_start_fails_with_a_reason(
    broker: StandInBroker, runner: Runner
) -> None:
    """A missing program ends the command as failed, with the reason, at once."""
    command_id = await run_command(broker, ["/nonexistent/program"])
    async with asyncio.timeout(30):
        await runner.wait_acknowledged(command_id)
    events = broker.events_of(command_id)
    assert [e.kind for e in events] == ["exit"]
    payload = events[0].payload
    assert payload is not None and payload["status"] == "failed"
    assert "cannot start '/nonexistent/program'" in payload["reason"]


async def test_cancel_terminates_then_kills(
    broker: StandInBroker, runner: Runner
) -> None:
    """A cancel sends TERM, then KILL after the grace; the exit says cancelled."""
    program = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    command_id = await run_command(broker, [sys.executable, "-c", program])
    await broker.wait_for(lambda: broker.output_of(command_id, "stdout") == b"ready\n")

    await broker.send(wire.CancelMessage(command_id=command_id))
    async with asyncio.timeout(30):
        await runner.wait_acknowledged(command_id)
    payload = broker.exit_of(command_id)
    assert payload is not None
    assert payload["status"] == "cancelled"
    assert payload["exit_code"] is None
    assert "killed by SIGKILL" in payload["reason"]


async def test_a_repeated_command_runs_once(
    broker: StandInBroker, runner: Runner
) -> None:
    """A command sent twice (say after a reconnect) starts one child."""
    command_id = uuid.uuid4()
    message = wire.CommandMessage(
        command_id=command_id, argv=[sys.executable, "-c", "print('once')"]
    )
    await broker.send(message)
    await broker.send(message)
    async with asyncio.timeout(30):
        await runner.wait_acknowledged(command_id)
    await asyncio.sleep(0.5)
    assert broker.output_of(command_id, "stdout") == b"once\n"
    assert sum(1 for e in broker.events_of(command_id) if e.kind == "status") == 1


async def test_refused_events_are_moved_aside_and_do_not_block(
    broker: StandInBroker, runner: Runner
) -> None:
    """An event refused for good goes to the refused table; later events go on."""
    broker.refuse = lambda event: (
        ("too_large", "event over the limit") if event.sequence == 2 else None
    )
    program = "import time\nprint('a', flush=True)\ntime.sleep(0.3)\nprint('b')"
    command_id = await run_command(broker, [sys.executable, "-c", program])
    async with asyncio.timeout(30):
        await runner.wait_acknowledged(command_id)

    assert [e.sequence for e in broker.events_of(command_id)] == [1, 3, 4]
    assert broker.output_of(command_id, "stdout") == b"b\n"
    state = runner.state()
    assert state.refused == 1 and state.spooled == 0


async def test_no_acknowledgement_means_resending_not_dropping(
    broker: StandInBroker, runner: Runner
) -> None:
    """With a broker that never acknowledges (an older one), events are resent."""
    broker.acknowledging = False
    command_id = await run_command(broker, [sys.executable, "-c", "print('hi')"])
    await broker.wait_for(lambda: broker.exit_of(command_id) is not None)
    first_count = broker.received_events
    await broker.wait_for(lambda: broker.received_events >= 2 * first_count, within=15)

    state = runner.state()
    assert state.spooled == 3 and state.unacknowledged == 3
    broker.acknowledging = True
    async with asyncio.timeout(30):
        await runner.wait_acknowledged(command_id)
    assert runner.state().spooled == 0


async def test_token_goes_in_the_authorization_header(
    broker: StandInBroker, runner: Runner
) -> None:
    """The upgrade request carries Authorization: Bearer <token>."""
    assert broker.authorization_headers[-1] == "Bearer rlr_stand-in-token"


async def test_a_wrong_token_keeps_the_runner_disconnected(
    broker: StandInBroker, tmp_path: Path
) -> None:
    """A refused token is retried with backoff, never counted as connected."""
    settings = runner_settings(broker, tmp_path / "spool.sqlite3", token="rlr_wrong")
    runner = Runner(settings)
    await runner.start()
    try:
        await broker.wait_for(lambda: len(broker.authorization_headers) >= 2)
        assert not runner.state().connected
        assert broker.connections == 0
    finally:
        await runner.stop()


async def test_events_made_offline_are_sent_after_connecting(
    broker: StandInBroker, tmp_path: Path
) -> None:
    """Events spooled while the broker was away are delivered once it is back."""
    port = broker.server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    settings = runner_settings(broker, tmp_path / "spool.sqlite3")
    await broker.stop()

    spool = Spool.open(settings.spool_path, settings.spool_bytes_limit)
    command_id = uuid.uuid4()
    spool.accept_command(command_id)
    for index in range(50):
        spool.append(command_id, "output", stream="stdout", data=b"%d\n" % index)
    spool.append(command_id, "exit", payload={"status": "succeeded"})
    spool.close()

    runner = Runner(settings)
    await runner.start()
    try:
        await asyncio.sleep(0.5)
        assert not runner.state().connected
        await broker.start(port)
        async with asyncio.timeout(30):
            await runner.wait_acknowledged(command_id)
        expected = b"".join(b"%d\n" % index for index in range(50))
        assert broker.output_of(command_id, "stdout") == expected
        assert [e.sequence for e in broker.events_of(command_id)] == list(range(1, 52))
    finally:
        await runner.stop()


async def test_restart_marks_a_running_command_lost(
    broker: StandInBroker, tmp_path: Path
) -> None:
    """A command whose exit was never spooled ends as lost on the next start."""
    settings = runner_settings(broker, tmp_path / "spool.sqlite3")
    spool = Spool.open(settings.spool_path, settings.spool_bytes_limit)
    command_id = uuid.uuid4()
    spool.accept_command(command_id)
    spool.record_pid(command_id, 4242)
    spool.append(command_id, "status", payload={"status": "running", "pid": 4242})
    spool.append(command_id, "output", stream="stdout", data=b"partial")
    spool.close()

    runner = Runner(settings)
    await runner.start()
    try:
        async with asyncio.timeout(30):
            await runner.wait_acknowledged(command_id)
    finally:
        await runner.stop()
    events = broker.events_of(command_id)
    assert [e.sequence for e in events] == [1, 2, 3]
    payload = events[-1].payload
    assert payload is not None and payload["status"] == "lost"
    assert "pid 4242" in payload["reason"]
    assert payload["streams"]["stdout"] == {"bytes": 7}


async def test_a_full_spool_blocks_the_child_instead_of_dropping(
    broker: StandInBroker, tmp_path: Path
) -> None:
    """With the broker silent and a small budget, the child is held, then resumes."""
    broker.acknowledging = False
    settings = runner_settings(
        broker,
        tmp_path / "spool.sqlite3",
        spool_bytes_limit=1024 * 1024,
        chunk_bytes=64 * 1024,
        acknowledge_timeout=30.0,
    )
    runner = Runner(settings)
    await runner.start()
    try:
        await runner.wait_connected()
        program = (
            "import sys\n"
            "for _ in range(320):\n"
            "    sys.stdout.buffer.write(b'y' * 65536)\n"
        )
        command_id = await run_command(broker, [sys.executable, "-c", program])

        # The budget fills and stays full: the child (20 MiB to write) waits.
        await broker.wait_for(lambda: runner.state().spooled_bytes > 900_000)
        await asyncio.sleep(1.0)
        held = runner.state()
        assert held.spooled_bytes <= settings.spool_bytes_limit
        assert held.running == 1

        broker.acknowledging = True
        async with asyncio.timeout(60):
            await runner.wait_acknowledged(command_id)
        assert broker.output_of(command_id, "stdout") == b"y" * 65536 * 320
    finally:
        await runner.stop()
