"""The whole stack in one process: a real child's bytes reach the web exactly."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import textwrap
from pathlib import Path

import asyncpg
import httpx
import pytest

from runledger.stack import DevOptions, DevStack

# A child that writes everything a build log can hold, on both streams:
# invalid UTF-8, NUL bytes, carriage returns without newlines, ANSI colours,
# markup, and a 3 MB line without any newline.
HOSTILE_CHILD = textwrap.dedent(
    r"""
    import sys
    streams = {"out": sys.stdout.buffer, "err": sys.stderr.buffer}
    for name, stream in streams.items():
        stream.write(b"plain line on std" + name.encode() + b"\n")
        stream.write(b"\xff\xfe invalid \xc3\x28 utf-8 \xed\xa0\x80\n")
        stream.write(b"nul\x00inside\x00\n")
        stream.write(b"progress 10%\rprogress 50%\rprogress 100%")
        stream.flush()
        stream.write(b"\x1b[1;31mred bold\x1b[0m \x1b[32mgreen\x1b[0m\n")
        stream.write(b"<script>alert('log')</script>&amp;\n")
        stream.write(bytes(range(256)) * 4)
        stream.flush()
        stream.write((b"0123456789abcdef" * 65536 * 3))  # 3 MiB, no newline
        stream.flush()
        stream.write(b"\nlast line of std" + name.encode() + b"\n")
        stream.flush()
    sys.exit(3)
    """
)


def expected_stream(name: str) -> bytes:
    """What HOSTILE_CHILD writes on one stream ("out" or "err")."""
    return (
        b"plain line on std" + name.encode() + b"\n"
        b"\xff\xfe invalid \xc3\x28 utf-8 \xed\xa0\x80\n"
        b"nul\x00inside\x00\n"
        b"progress 10%\rprogress 50%\rprogress 100%"
        b"\x1b[1;31mred bold\x1b[0m \x1b[32mgreen\x1b[0m\n"
        b"<script>alert('log')</script>&amp;\n"
        + bytes(range(256)) * 4
        + b"0123456789abcdef" * 65536 * 3
        + b"\nlast line of std"
        + name.encode()
        + b"\n"
    )


@pytest.fixture
async def stack(database_url: str, tmp_path: Path):
    """The dev stack on ports chosen by the kernel, state in a temp folder."""
    dev_stack = DevStack(
        DevOptions(
            database_url=database_url,
            broker_port=0,
            web_port=0,
            state_dir=tmp_path / "state",
        )
    )
    await dev_stack.start()
    try:
        yield dev_stack
    finally:
        await dev_stack.stop()


async def read_all_through_api(web_url: str, command_id: object, limit: int):
    """Page through the read API; return the events in the order received."""
    received = []
    after = 0
    async with httpx.AsyncClient(base_url=web_url, timeout=30) as client:
        while True:
            response = await client.get(
                f"/api/commands/{command_id}/events",
                params={"after": after, "limit": limit},
            )
            response.raise_for_status()
            page = response.json()
            events = page["events"]
            assert len(events) <= limit
            if not events:
                return received
            received.extend(events)
            after = page["next_after"]


@pytest.mark.slow
async def test_hostile_output_is_stored_and_served_byte_exact(
    stack: DevStack, database_url: str, tmp_path: Path
) -> None:
    """Invalid UTF-8, NUL, \\r, ANSI and a 3 MB line survive every hop exactly."""
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE_CHILD)

    outcome = await stack.run_command([sys.executable, str(script)])

    # The runner's figures of what the child wrote match what Postgres holds.
    assert outcome.status == "failed"
    assert outcome.exit_code == 3
    assert outcome.verified, outcome.streams
    written = {check.stream: check.written_bytes for check in outcome.streams}
    assert written == {
        "stdout": len(expected_stream("out")),
        "stderr": len(expected_stream("err")),
    }
    assert outcome.events_pending == 0
    assert outcome.events_delivered == outcome.events_stored

    # Each sequence is stored exactly once, 1..n without a hole.
    connection = await asyncpg.connect(database_url)
    try:
        sequences = [
            record["sequence"]
            for record in await connection.fetch(
                "SELECT sequence FROM events WHERE command_id = $1 ORDER BY sequence",
                outcome.command_id,
            )
        ]
    finally:
        await connection.close()
    assert sequences == list(range(1, len(sequences) + 1))
    # Chunked by size and time, not one event per line or per byte.
    assert len(sequences) < 200

    # `runledger log` writes the same bytes, per stream.
    environment = {**os.environ, "DATABASE_URL": database_url}
    for stream, name in (("stdout", "out"), ("stderr", "err")):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "runledger",
            "log",
            str(outcome.command_id),
            "--stream",
            stream,
            stdout=asyncio.subprocess.PIPE,
            env=environment,
        )
        logged, _ = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode == 0
        assert logged == expected_stream(name)

    # The read API, in pages of 7 events, gives every sequence once, in order.
    events = await read_all_through_api(stack.web_url, outcome.command_id, limit=7)
    assert [event["sequence"] for event in events] == sequences
    served = {"stdout": b"", "stderr": b""}
    for event in events:
        if event["kind"] == "output":
            served[event["stream"]] += base64.b64decode(event["data"])
    assert served == {
        "stdout": expected_stream("out"),
        "stderr": expected_stream("err"),
    }
