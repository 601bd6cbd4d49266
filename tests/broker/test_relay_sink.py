"""How the relay's sink client reads a sink's answers: delivered, retry, or dead."""

from __future__ import annotations

import asyncio
import socket

import pytest

from broker.relay_sink import SinkClient
from core.errors import DeliveryError
from tests.broker.relay_harness import (
    SECRET,
    Answer,
    TestSink,
    answering,
    running_sink,
)

BODY = (
    b'{"delivery_id": "c:1-1", "command_id": "0b5a4620-0000-4000-8000-000000000000",'
    b' "events": []}'
)


async def deliver_once(sink: TestSink, answer: Answer) -> int:
    """Have ``sink`` answer ``answer`` and send it one delivery."""
    sink.behaviour = answering(answer)
    client = SinkClient(sink.url, SECRET, 5.0, max_connections=1)
    try:
        return await client.deliver("c:1-1", BODY)
    finally:
        await client.close()


async def test_a_2xx_is_a_delivery() -> None:
    """A 200 or 204 is success; the signed delivery reached the sink."""
    async with running_sink() as sink:
        assert await deliver_once(sink, Answer(204, body=b"")) == 204
    assert sink.requests[0].delivery_id == "c:1-1"
    assert sink.refused_signatures == 0


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_server_errors_and_throttling_are_retried(status: int) -> None:
    """5xx, 408 and 429 are worth another try, never a dead command."""
    async with running_sink() as sink:
        with pytest.raises(DeliveryError) as raised:
            await deliver_once(sink, Answer(status, body=b"later"))
    assert raised.value.status == status
    assert not raised.value.permanent
    assert str(raised.value) == f"sink answered {status}: later"


@pytest.mark.parametrize("status", [301, 400, 401, 404, 409, 422])
async def test_other_answers_are_permanent(status: int) -> None:
    """Most 4xx (and redirects) cannot be fixed by retrying: the command goes dead."""
    async with running_sink() as sink:
        with pytest.raises(DeliveryError) as raised:
            await deliver_once(sink, Answer(status, body=b"no"))
    assert raised.value.permanent
    assert raised.value.status == status


async def test_retry_after_is_read_from_the_answer() -> None:
    """The seconds a sink asks for travel with the error to the backoff."""
    async with running_sink() as sink:
        with pytest.raises(DeliveryError) as raised:
            await deliver_once(sink, Answer(429, headers={"retry-after": "7"}))
    assert raised.value.retry_after == 7.0


async def test_a_sink_that_does_not_answer_in_time_is_a_timeout() -> None:
    """The whole request is bounded by the timeout, and that failure is retried."""
    async with running_sink() as sink:

        async def hang(_number: int, _delivery_id: str) -> Answer:
            await asyncio.sleep(30)
            return Answer()

        sink.behaviour = hang
        client = SinkClient(sink.url, SECRET, 0.5, max_connections=1)
        try:
            with pytest.raises(DeliveryError, match=r"did not answer within 0\.5 s"):
                await client.deliver("c:1-1", BODY)
        finally:
            await client.close()


async def test_an_unreachable_sink_is_retried() -> None:
    """Connection refused is a failure worth retrying, with no status."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = SinkClient(f"http://127.0.0.1:{port}/", SECRET, 2.0, max_connections=1)
    try:
        with pytest.raises(DeliveryError, match="could not reach the sink") as raised:
            await client.deliver("c:1-1", b"{}")
    finally:
        await client.close()
    assert raised.value.status is None
    assert not raised.value.permanent
