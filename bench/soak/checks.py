"""The soak's verdict: what ``runledger audit`` says, and what SQL proves.

For every command the log must be contiguous from 1 (nothing missing), hold
each event once (as many distinct ids as rows), end with exactly one exit
event, and be delivered through its last sequence with the relay not parked
dead. Its output must be what the child wrote: byte for byte when the
command finished, and a prefix of it when its runner was killed under it
(the command is then ``lost``, which the design reports openly). Commands
the web tier verified must have matched.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.soak.child import expected_output
from core.database import Queries

queries = Queries(Path(__file__).parent / "sql" / "checks.sql")
FINAL_STATUSES = ("succeeded", "failed", "cancelled", "lost")


@dataclass(frozen=True)
class Submitted:
    """A command the soak submitted, and what its child will write."""

    id: uuid.UUID
    seed: int
    lines: int


@dataclass
class Verdict:
    """The figures of the final check; ``events_lost`` must be zero."""

    commands: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    events_stored: int = 0
    missing_sequences: int = 0
    duplicate_events: int = 0
    without_single_exit: int = 0
    output_mismatches: int = 0
    verification_failed: int = 0
    not_finished: int = 0
    undelivered_events: int = 0
    dead: int = 0
    refused: int = 0
    gaps_recorded: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def events_lost(self) -> int:
        """Sequences missing from logs, plus one per command whose bytes differ."""
        return self.missing_sequences + self.output_mismatches

    @property
    def clean(self) -> bool:
        return not (
            self.events_lost
            or self.duplicate_events
            or self.without_single_exit
            or self.verification_failed
            or self.not_finished
            or self.undelivered_events
            or self.dead
            or self.refused
        )


async def check(pool: asyncpg.Pool, submitted: list[Submitted]) -> Verdict:
    """Check every submitted command's log against what its child wrote."""
    verdict = Verdict(commands=len(submitted))
    by_id = {command.id: command for command in submitted}
    async with pool.acquire() as connection:
        rows = await connection.fetch(queries.command_logs)
        verdict.refused = await connection.fetchval(queries.refused_total)
        verdict.gaps_recorded = await connection.fetchval(queries.gaps_total)
        for row in rows:
            command = by_id.get(row["id"])
            if command is None:
                continue
            await _check_command(connection, row, command, verdict)
    return verdict


async def _check_command(
    connection: asyncpg.Connection,
    row: asyncpg.Record,
    command: Submitted,
    verdict: Verdict,
) -> None:
    status = row["status"]
    verdict.finished[status] = verdict.finished.get(status, 0) + 1
    verdict.events_stored += row["events"]
    label = f"command {command.id} (seed {command.seed})"

    if status not in FINAL_STATUSES:
        verdict.not_finished += 1
        verdict.problems.append(f"{label} is still {status}")
        return

    # Contiguous from 1, each event once, one exit event and it is the last.
    missing = row["last_sequence"] - row["events"]
    if row["events"] and row["first_sequence"] != 1:
        missing = max(missing, row["first_sequence"] - 1)
    if missing:
        verdict.missing_sequences += missing
        verdict.problems.append(f"{label}: {missing} sequences missing")
    if row["distinct_ids"] != row["events"]:
        verdict.duplicate_events += row["events"] - row["distinct_ids"]
        verdict.problems.append(f"{label}: an event id is stored twice")
    if row["exit_events"] != 1 or row["exit_sequence"] != row["last_sequence"]:
        verdict.without_single_exit += 1
        verdict.problems.append(
            f"{label}: {row['exit_events']} exit events, the last at "
            f"{row['exit_sequence']} of {row['last_sequence']}"
        )

    # Delivered through the end, and not parked dead.
    undelivered = max(0, row["last_sequence"] - (row["delivered_through"] or 0))
    if undelivered:
        verdict.undelivered_events += undelivered
        verdict.problems.append(f"{label}: {undelivered} events not delivered")
    if row["delivery_state"] == "dead":
        verdict.dead += 1
        verdict.problems.append(f"{label}: delivery parked dead")

    if status in ("succeeded", "failed") and row["verification_matched"] is not True:
        verdict.verification_failed += 1
        verdict.problems.append(
            f"{label}: the web tier's verification is "
            f"{row['verification_matched']} (expected true)"
        )

    if not await _output_matches(connection, command, complete=status == "succeeded"):
        verdict.output_mismatches += 1
        verdict.problems.append(f"{label} ({status}): stored output differs")


async def _output_matches(
    connection: asyncpg.Connection, command: Submitted, *, complete: bool
) -> bool:
    expected = await asyncio.to_thread(expected_output, command.seed, command.lines)
    if complete:
        stored = {
            r["stream"]: (r["bytes"], r["sha256"])
            for r in await connection.fetch(queries.stored_streams, command.id)
        }
        return all(
            stored.get(stream, (0, _EMPTY_SHA256)) == (digest.size, digest.sha256)
            for stream, digest in expected.items()
        )

    # A command cut short must hold a prefix of what its child wrote.
    for stream, digest in expected.items():
        data = await connection.fetchval(
            queries.stored_stream_bytes, command.id, stream
        )
        if not digest.data.startswith(bytes(data)):
            return False
    return True


_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
