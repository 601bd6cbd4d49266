"""The broker link: frames, hello, refused frames, dropped connections."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from core import wire
from core.errors import ConfigurationError
from core.settings import load_settings
from runner.connection import encode_event, frame_of
from runner.daemon import Runner
from runner.settings import RunnerSettings
from runner.spool import Spool
from tests.runner.conftest import StandInBroker, runner_settings


def test_frames_decode_as_wire_events(tmp_path: Path) -> None:
    """Events encoded from the spool's text decode as core.wire messages."""
    spool = Spool.open(tmp_path / "spool.sqlite3", bytes_limit=1_000_000)
    command_id = uuid.uuid4()
    spool.accept_command(command_id)
    status = spool.append(command_id, "status", payload={"status": "running", "pid": 7})
    output = spool.append(command_id, "output", stream="stderr", data=b"\x00\xff\r")

    message = wire.runner_message_decoder.decode(
        frame_of([encode_event(status), encode_event(output)])
    )
    assert isinstance(message, wire.EventsMessage)
    first, second = message.events
    assert (first.command_id, first.id, first.sequence) == (command_id, status.id, 1)
    assert first.payload == {"status": "running", "pid": 7}
    assert first.stream is None and first.data == b""
    assert (second.kind, second.stream, second.data) == (
        "output",
        "stderr",
        b"\x00\xff\r",
    )
    assert second.emitted_at is not None and abs(second.emitted_at - time.time()) < 60


async def test_an_older_broker_without_hello_still_gets_events(
    broker: StandInBroker, tmp_path: Path
) -> None:
    """No hello within the timeout: default limits, commands run, events flow."""
    broker.saying_hello = False
    runner = Runner(
        runner_settings(broker, tmp_path / "spool.sqlite3", hello_timeout=0.5)
    )
    await runner.start()
    try:
        await asyncio.wait_for(runner.wait_connected(), 10)
        command_id = uuid.uuid4()
        await broker.send(
            wire.CommandMessage(command_id, [sys.executable, "-c", "print('old')"])
        )
        async with asyncio.timeout(30):
            await runner.wait_acknowledged(command_id)
        assert broker.output_of(command_id, "stdout") == b"old\n"
    finally:
        await runner.stop()


async def test_a_refused_frame_is_resent_soon(
    broker: StandInBroker, tmp_path: Path
) -> None:
    """A frame refused as a whole (rate limited) is resent well before the timeout."""
    broker.refusing_frames = 1
    runner = Runner(
        runner_settings(broker, tmp_path / "spool.sqlite3", acknowledge_timeout=30.0)
    )
    await runner.start()
    try:
        await runner.wait_connected()
        command_id = uuid.uuid4()
        started = time.monotonic()
        await broker.send(
            wire.CommandMessage(command_id, [sys.executable, "-c", "print('x')"])
        )
        async with asyncio.timeout(20):
            await runner.wait_acknowledged(command_id)
        assert time.monotonic() - started < 20
        assert broker.output_of(command_id, "stdout") == b"x\n"
    finally:
        await runner.stop()


async def test_a_dropped_connection_is_replaced_and_nothing_is_lost(
    broker: StandInBroker, runner: Runner
) -> None:
    """The broker closing the socket mid-stream costs a reconnect, not events."""
    program = (
        "import sys, time\n"
        "for i in range(40):\n"
        "    print(i, flush=True)\n"
        "    time.sleep(0.05)\n"
    )
    command_id = uuid.uuid4()
    await broker.send(wire.CommandMessage(command_id, [sys.executable, "-c", program]))
    await broker.wait_for(lambda: len(broker.events_of(command_id)) >= 3)
    assert broker.current is not None
    broker.current.transport.abort()

    async with asyncio.timeout(30):
        await runner.wait_acknowledged(command_id)
    assert broker.connections >= 2
    expected = "".join(f"{i}\n" for i in range(40)).encode()
    assert broker.output_of(command_id, "stdout") == expected
    sequences = [e.sequence for e in broker.events_of(command_id)]
    assert sequences == list(range(1, len(sequences) + 1))


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by the openssl command."""
    certificate, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-keyout", str(key), "-out", str(certificate), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return certificate, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_wss_is_verified_with_the_ca_bundle(tmp_path: Path) -> None:
    """A wss:// broker is trusted through the CA bundle setting, and not without it."""
    certificate, key = self_signed_certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certificate, key)
    broker = StandInBroker(tls=tls)
    await broker.start()
    untrusting = Runner(runner_settings(broker, tmp_path / "untrusting.sqlite3"))
    trusting = Runner(
        runner_settings(broker, tmp_path / "trusting.sqlite3", ca_bundle=certificate)
    )
    try:
        assert broker.url.startswith("wss://")
        await untrusting.start()
        await trusting.start()
        await asyncio.wait_for(trusting.wait_connected(), 10)
        await asyncio.sleep(1.0)
        assert broker.connections == 1
        assert not untrusting.state().connected
    finally:
        await untrusting.stop()
        await trusting.stop()
        await broker.stop()


def test_a_ca_bundle_needs_a_wss_url(tmp_path: Path) -> None:
    """Setting a CA bundle for a ws:// broker is a configuration error."""
    with pytest.raises(ConfigurationError, match="wss://"):
        load_settings(
            RunnerSettings,
            {"broker_url": "ws://127.0.0.1:1", "ca_bundle": tmp_path / "ca.pem"},
            environ={},
        )
