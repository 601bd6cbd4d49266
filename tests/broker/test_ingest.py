"""Group commit: what is stored, what is acknowledged, what is refused."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque

import asyncpg

from broker.frames import PendingEvent
from broker.ingest import IngestWriter, Submission, sequence_anomalies
from broker.server import BrokerServer
from core import wire
from tests.broker.conftest import RunnerWithCommand, StartBroker
from tests.broker.wire_client import WireRunner, output_event
from tests.conftest import create_command, register_runner


async def stored_events(
    pool: asyncpg.Pool, command_id: uuid.UUID
) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT sequence, id, kind, stream, data FROM events "
        "WHERE command_id = $1 ORDER BY sequence",
        command_id,
    )


def test_sequence_anomalies_finds_gaps_and_late_arrivals() -> None:
    """A jump opens a gap with its range; a lower sequence later is out of order."""
    anomalies = sequence_anomalies(3, [4, 8, 6, 9, 12])
    assert anomalies.gaps == [(5, 7), (10, 11)]
    assert anomalies.out_of_order == [6]

    clean = sequence_anomalies(0, [1, 2, 3])
    assert clean.gaps == [] and clean.out_of_order == []


async def test_events_are_stored_in_order_and_acknowledged(
    broker: BrokerServer, pool: asyncpg.Pool, alpha: RunnerWithCommand
) -> None:
    """A batch is stored byte for byte and every event acknowledged after commit."""
    command_id = alpha.command_id
    runner = await WireRunner.connect(broker.url, alpha.token)

    payloads = [b"\x00\xff\xfe raw", b"\r progress \x1b[31mred\x1b[0m", b"line\n"]
    events = [output_event(command_id, n + 1, data) for n, data in enumerate(payloads)]
    await runner.send_events(events)
    await runner.wait_settled(events)

    assert runner.acknowledged == {(command_id, e.sequence): e.id for e in events}
    rows = await stored_events(pool, command_id)
    assert [bytes(r["data"]) for r in rows] == payloads
    assert [r["id"] for r in rows] == [e.id for e in events]
    await runner.close()


async def test_crash_after_commit_then_resend_is_acknowledged_once(
    start_broker: StartBroker, pool: asyncpg.Pool, alpha: RunnerWithCommand
) -> None:
    """Events committed but not acknowledged are acknowledged on resend, stored once."""
    broker = await start_broker(fault_crash_before_acknowledge=1)
    command_id = alpha.command_id
    events = [output_event(command_id, n, f"chunk {n}".encode()) for n in (1, 2, 3)]

    crashed = await WireRunner.connect(broker.url, alpha.token)
    await crashed.send_events(events)
    await crashed.wait_closed()
    assert not crashed.acknowledged
    assert len(await stored_events(pool, command_id)) == 3

    resent = await WireRunner.connect(broker.url, alpha.token)
    await resent.send_events(events)
    await resent.wait_settled(events)

    assert resent.acknowledged == {(command_id, e.sequence): e.id for e in events}
    assert not resent.refused
    rows = await stored_events(pool, command_id)
    assert [r["id"] for r in rows] == [e.id for e in events]
    await resent.close()


async def test_same_key_twice_in_one_batch(
    broker: BrokerServer, pool: asyncpg.Pool, alpha: RunnerWithCommand
) -> None:
    """An identical repeat in a batch is acknowledged; a different one is a conflict."""
    command_id = alpha.command_id
    runner = await WireRunner.connect(broker.url, alpha.token)

    original = output_event(command_id, 1, b"original")
    impostor = output_event(command_id, 1, b"impostor")
    await runner.send_events([original, original, impostor])
    await runner.wait_settled([original, impostor])

    assert runner.acknowledged == {(command_id, 1): original.id}
    assert [(r.code, r.id) for r in runner.refused] == [("conflict", impostor.id)]
    rows = await stored_events(pool, command_id)
    assert [(r["id"], bytes(r["data"])) for r in rows] == [(original.id, b"original")]
    await runner.close()


async def test_conflicting_resend_is_refused_and_recorded(
    broker: BrokerServer, pool: asyncpg.Pool, alpha: RunnerWithCommand
) -> None:
    """A different event at a stored key is refused and recorded, never stored."""
    command_id = alpha.command_id
    runner = await WireRunner.connect(broker.url, alpha.token)

    original = output_event(command_id, 1, b"original")
    await runner.send_events([original])
    await runner.wait_settled([original])

    same_id_new_content = output_event(command_id, 1, b"changed", event_id=original.id)
    new_id_same_key = output_event(command_id, 1, b"original")
    await runner.send_events([same_id_new_content])
    await runner.wait_settled([same_id_new_content])
    await runner.send_events([new_id_same_key])
    await runner.wait_settled([new_id_same_key])

    assert [r.code for r in runner.refused] == ["conflict", "conflict"]
    assert "different content" in runner.refused[0].reason
    assert str(original.id) in runner.refused[1].reason
    rows = await stored_events(pool, command_id)
    assert [(r["id"], bytes(r["data"])) for r in rows] == [(original.id, b"original")]
    recorded = await pool.fetchval(
        "SELECT count(*) FROM refused_events "
        "WHERE code = 'conflict' AND command_id = $1",
        command_id,
    )
    assert recorded == 2
    await runner.close()


async def test_another_runners_command_and_unknown_commands_are_refused(
    broker: BrokerServer, pool: asyncpg.Pool
) -> None:
    """Events for a command of another runner, or of no command, are refused by code."""
    alpha = await register_runner(pool, "alpha")
    beta = await register_runner(pool, "beta")
    betas_command = await create_command(pool, beta.id, ["true"])
    alphas_command = await create_command(pool, alpha.id, ["true"])
    runner = await WireRunner.connect(broker.url, alpha.token)

    foreign = output_event(betas_command, 1, b"not mine")
    unknown = output_event(uuid.uuid4(), 1, b"no such command")
    mine = output_event(alphas_command, 1, b"mine")
    await runner.send_events([foreign, unknown, mine])
    await runner.wait_settled([foreign, unknown, mine])

    codes = {r.id: r.code for r in runner.refused}
    assert codes == {foreign.id: "not_assigned", unknown.id: "unknown_command"}
    assert runner.acknowledged == {(alphas_command, 1): mine.id}
    assert await stored_events(pool, betas_command) == []
    await runner.close()


async def test_legacy_events_get_id_and_sequence_from_the_broker(
    broker: BrokerServer, pool: asyncpg.Pool, alpha: RunnerWithCommand
) -> None:
    """Events without id or sequence are numbered by the broker after stored ones."""
    command_id = alpha.command_id
    runner = await WireRunner.connect(broker.url, alpha.token)

    first = output_event(command_id, 1, b"numbered")
    await runner.send_events([first])
    await runner.wait_settled([first])

    legacy = wire.WireEvent(
        command_id=command_id, kind="output", stream="stdout", data=b"a"
    )
    await runner.send_events([legacy, legacy])
    await runner.receive_until(lambda r: len(r.acknowledged) == 3)
    await runner.send(wire.LegacyEventMessage(event=legacy))
    await runner.receive_until(lambda r: len(r.acknowledged) == 4)

    rows = await stored_events(pool, command_id)
    assert [r["sequence"] for r in rows] == [1, 2, 3, 4]
    assert len({r["id"] for r in rows}) == 4
    await runner.close()


async def test_gaps_and_out_of_order_are_stored_and_counted(
    broker: BrokerServer, pool: asyncpg.Pool, alpha: RunnerWithCommand
) -> None:
    """A gap and a late arrival are still stored, and show in the metrics."""
    from broker import metrics

    command_id = alpha.command_id
    runner = await WireRunner.connect(broker.url, alpha.token)
    gaps_before = metrics.SEQUENCE_GAPS._value.get()
    late_before = metrics.OUT_OF_ORDER._value.get()

    for sequence in (1, 4, 2):
        event = output_event(command_id, sequence, b"x")
        await runner.send_events([event])
        await runner.wait_settled([event])

    rows = await stored_events(pool, command_id)
    assert [r["sequence"] for r in rows] == [1, 2, 4]
    assert metrics.SEQUENCE_GAPS._value.get() == gaps_before + 1
    assert metrics.OUT_OF_ORDER._value.get() == late_before + 1
    await runner.close()


async def test_commit_notifies_each_grown_command(
    broker: BrokerServer, alpha: RunnerWithCommand, database_url: str
) -> None:
    """The commit sends pg_notify on runledger_events with the command id."""
    command_id = alpha.command_id
    notified: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(
        "runledger_events", lambda *args: notified.put_nowait(args[-1])
    )
    runner = await WireRunner.connect(broker.url, alpha.token)

    event = output_event(command_id, 1, b"x")
    await runner.send_events([event])
    await runner.wait_settled([event])

    assert await asyncio.wait_for(notified.get(), 10) == str(command_id)
    await runner.close()
    await listener.close()


async def test_legacy_resend_with_an_id_is_acknowledged_at_its_first_sequence(
    broker: BrokerServer, pool: asyncpg.Pool, alpha: RunnerWithCommand
) -> None:
    """An event with an id but no sequence, sent twice, is stored once."""
    runner = await WireRunner.connect(broker.url, alpha.token)
    legacy = wire.WireEvent(
        command_id=alpha.command_id,
        kind="progress",
        id=uuid.uuid4(),
        payload={"percent": 40},
    )

    await runner.send(wire.LegacyEventMessage(event=legacy))
    await runner.wait_settled([legacy])
    await runner.send(wire.LegacyEventMessage(event=legacy))
    await runner.receive_until(lambda r: len(r.acknowledgements) == 2)

    assert [a.sequence for a in runner.acknowledgements] == [1, 1]
    assert len(await stored_events(pool, alpha.command_id)) == 1
    await runner.close()


async def test_a_revoked_runner_stores_nothing_more(
    broker: BrokerServer, pool: asyncpg.Pool, alpha: RunnerWithCommand
) -> None:
    """Revoking a connected runner fences its connection at the next write."""
    runner = await WireRunner.connect(broker.url, alpha.token)
    await pool.execute("UPDATE runners SET revoked_at = now() WHERE id = $1", alpha.id)

    await runner.send_events([output_event(alpha.command_id, 1, b"too late")])
    await runner.wait_closed()

    assert [error.code for error in runner.errors] == ["fenced"]
    assert await stored_events(pool, alpha.command_id) == []


async def test_frames_of_a_command_being_committed_wait_in_order() -> None:
    """The writer sets aside frames whose command is in flight, keeping their order."""
    command_x, command_y = uuid.uuid4(), uuid.uuid4()

    def frame_of(command_id: uuid.UUID) -> Submission:
        event = PendingEvent(
            command_id, "output", uuid.uuid4(), 1, "stdout", b"", None, None
        )
        return Submission(runner_id=uuid.uuid4(), connection_epoch=1, events=[event])

    first_x, only_y, second_x = (
        frame_of(command_x),
        frame_of(command_y),
        frame_of(command_x),
    )
    held = deque([first_x, only_y, second_x])

    ready = IngestWriter._take_ready(held, {command_x})

    assert ready == [only_y]
    assert list(held) == [first_x, second_x]
