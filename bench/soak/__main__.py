"""``python -m bench.soak``: runledger under random faults must lose nothing.

The full run drives 20 runners and 1,000,000 events; ``--ci`` is a preset of
about two minutes. The run exits 0 only when ``runledger audit`` passes, the
SQL checks find nothing lost, duplicated, undelivered or dead, and every
fault could be injected.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.soak.checks import FINAL_STATUSES, Submitted, Verdict, check, queries
from bench.soak.child import LINE_BYTES
from bench.soak.cluster import CHUNK_BYTES, Cluster, runledger_argv
from bench.soak.faults import FAULTS, FaultInjector
from core.commands import submit_command
from core.logging import configure_logging, get_logger

log = get_logger("soak")

CHILD = Path(__file__).resolve().parent / "child.py"
COMMANDS_PER_RUNNER = 2
POLL_SECONDS = 0.5
# No event stored for this long, with commands waiting, means the run is stuck.
STALL_SECONDS = 90.0


@dataclass(frozen=True)
class Plan:
    """How big and how long one soak is."""

    events: int
    runners: int
    seconds: float
    drain_seconds: float
    fault_gap: tuple[float, float]
    lines: tuple[int, int]
    seed: int


FULL = Plan(1_000_000, 20, 1200, 300, (3, 10), (500, 3000), 8)
CI = Plan(20_000, 4, 90, 90, (1, 3), (100, 600), 8)


def estimated_events(lines: int) -> int:
    """Events a child of ``lines`` lines makes at most: chunks, status and exit."""
    return math.ceil(lines * LINE_BYTES / CHUNK_BYTES) + 2


async def drive(
    cluster: Cluster,
    plan: Plan,
    chooser: random.Random,
    deadline: float,
    every_fault_seen: Callable[[], bool],
) -> tuple[list[Submitted], bool]:
    """Keep every runner busy until the events are submitted or time is up.

    The load also goes on, within the time, until every kind of fault has
    struck at least once, so a short run still meets all of them.

    Returns the commands submitted, and whether the run stalled: no event
    stored for ``STALL_SECONDS`` while commands were waiting.
    """
    submitted: list[Submitted] = []
    active: dict[uuid.UUID, list[Submitted]] = {r.id: [] for r in cluster.runners}
    planned = 0
    seed = plan.seed * 1_000_000
    inserted = -1
    progressed_at = time.monotonic()

    while (planned < plan.events or not every_fault_seen()) and (
        time.monotonic() < deadline
    ):
        # Past the target, the runners stay busy until every fault has struck.
        target = plan.events if every_fault_seen() else math.inf
        running = [c.id for group in active.values() for c in group]
        try:
            planned, seed = await _top_up(
                cluster,
                plan,
                chooser,
                active,
                submitted,
                running,
                planned,
                target,
                seed,
            )
            assert cluster.pool is not None
            now_inserted = await cluster.pool.fetchval(queries.events_inserted)
        except Exception as error:
            # Postgres may be restarting (a fault): start again with fresh
            # connections shortly, whatever state the old ones were left in.
            log.warning("soak.submit_retry", error=str(error) or type(error).__name__)
            await _fresh_connections(cluster)
        else:
            if now_inserted != inserted:
                inserted, progressed_at = now_inserted, time.monotonic()
            elif time.monotonic() - progressed_at > STALL_SECONDS:
                return submitted, True
        await asyncio.sleep(POLL_SECONDS)
    return submitted, False


async def _top_up(
    cluster: Cluster,
    plan: Plan,
    chooser: random.Random,
    active: dict[uuid.UUID, list[Submitted]],
    submitted: list[Submitted],
    running: list[uuid.UUID],
    planned: int,
    target: float,
    seed: int,
) -> tuple[int, int]:
    assert cluster.pool is not None
    async with cluster.pool.acquire() as connection:
        states = {
            r["id"]: r["status"]
            for r in await connection.fetch(queries.command_states, running)
        }
        for runner_id, group in active.items():
            group[:] = [c for c in group if states.get(c.id) not in FINAL_STATUSES]
            while len(group) < COMMANDS_PER_RUNNER and planned < target:
                seed += 1
                lines = chooser.randint(*plan.lines)
                argv = [sys.executable, str(CHILD), str(seed), str(lines)]
                command_id = await submit_command(connection, runner_id, argv)
                command = Submitted(command_id, seed, lines)
                group.append(command)
                submitted.append(command)
                planned += estimated_events(lines)
    return planned, seed


async def _fresh_connections(cluster: Cluster) -> None:
    assert cluster.pool is not None
    with contextlib.suppress(Exception):
        await cluster.pool.expire_connections()


async def drain(cluster: Cluster, submitted: list[Submitted], seconds: float) -> bool:
    """Wait until every command finished and every event was delivered."""
    assert cluster.pool is not None
    deadline = time.monotonic() + seconds
    ids = [c.id for c in submitted]
    while time.monotonic() < deadline:
        try:
            async with cluster.pool.acquire() as connection:
                states = await connection.fetch(queries.command_states, ids)
                undelivered = await connection.fetchval(queries.undelivered_total)
        except Exception as error:
            log.warning("soak.drain_retry", error=str(error) or type(error).__name__)
            await _fresh_connections(cluster)
            await asyncio.sleep(1)
            continue
        unfinished = sum(1 for r in states if r["status"] not in FINAL_STATUSES)
        if unfinished == 0 and undelivered == 0:
            return True
        await asyncio.sleep(1)
    return False


async def audit(cluster: Cluster) -> tuple[int, str]:
    """Run ``runledger audit`` against the soak's database; (exit code, output)."""
    process = await asyncio.create_subprocess_exec(
        *runledger_argv("audit"),
        env=cluster._env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


def print_table(
    injector: FaultInjector,
    verdict: Verdict,
    audit_code: int,
    stalled: bool,
    seconds: float,
) -> None:
    """The faults injected and what was lost, as the issue asks."""
    print(f"\n{'fault':<32} {'injected':>8} {'failed':>7}")
    print("-" * 49)
    for name in FAULTS:
        print(f"{name:<32} {injector.injected[name]:>8} {injector.failed[name]:>7}")
    print(f"{'total':<32} {sum(injector.injected.values()):>8}")
    rows = [
        ("commands", verdict.commands),
        ("finished (by status)", json.dumps(verdict.finished, sort_keys=True)),
        ("events stored", verdict.events_stored),
        ("events lost", verdict.events_lost),
        ("  sequences missing", verdict.missing_sequences),
        ("  commands with output differing", verdict.output_mismatches),
        ("events stored twice", verdict.duplicate_events),
        ("logs without one final exit", verdict.without_single_exit),
        ("verification not matched", verdict.verification_failed),
        ("commands not finished", verdict.not_finished),
        ("events not delivered", verdict.undelivered_events),
        ("commands parked dead", verdict.dead),
        ("events refused", verdict.refused),
        ("gaps recorded by the relay", verdict.gaps_recorded),
        ("runledger audit exit code", audit_code),
        ("stalled (no progress for 90 s)", stalled),
        ("seconds", round(seconds)),
    ]
    print(f"\n{'check':<34} value")
    print("-" * 49)
    for name, value in rows:
        print(f"{name:<34} {value}")


async def soak(plan: Plan, workdir: Path) -> int:
    """Run one soak; return the exit code."""
    chooser = random.Random(plan.seed)
    cluster = Cluster(workdir, plan.runners)
    started = time.monotonic()
    injector = FaultInjector(cluster, chooser, *plan.fault_gap)
    faults: asyncio.Task[None] | None = None
    # SIGTERM ends the soak like Ctrl-C: through the cleanup below.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        await cluster.start()
        print(
            f"soak: {plan.runners} runners, up to {plan.events:,} events, "
            f"{plan.seconds:.0f} s of faults; logs in {workdir}",
            file=sys.stderr,
            flush=True,
        )
        faults = asyncio.create_task(injector.run())
        submitted, stalled = await drive(
            cluster,
            plan,
            chooser,
            time.monotonic() + plan.seconds,
            injector.every_kind_struck,
        )
        if stalled:
            print(
                f"soak: STALLED: no event stored for {STALL_SECONDS:.0f} s",
                file=sys.stderr,
            )
        else:
            # Faults carry on while the last commands run, then stop.
            await drain(cluster, submitted, plan.seconds / 4)
        injector.stop()
        await asyncio.wait_for(faults, 60)
        drained = await drain(
            cluster, submitted, STALL_SECONDS if stalled else plan.drain_seconds
        )
        if not drained:
            print("soak: the drain did not finish in time", file=sys.stderr)
        audit_code, audit_output = await audit(cluster)
        (workdir / "audit.txt").write_text(audit_output)
        assert cluster.pool is not None
        verdict = await check(cluster.pool, submitted)
    finally:
        # No fault may restart a process once the cluster is going down.
        injector.stop()
        if faults is not None and not faults.done():
            faults.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await faults
        (workdir / "faults.txt").write_text("\n".join(injector.timeline) + "\n")
        await cluster.stop()

    print_table(injector, verdict, audit_code, stalled, time.monotonic() - started)
    for problem in verdict.problems[:20]:
        print(f"problem: {problem}")
    if audit_code != 0:
        print(audit_output[-3000:])
    passed = verdict.clean and audit_code == 0 and not injector.failed and not stalled
    print(f"\nsoak: {'PASS' if passed else 'FAIL'}: {verdict.events_lost} events lost")
    return 0 if passed else 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--ci", action="store_true", help="the ~2 minute preset")
    parser.add_argument("--events", type=int, help="events to produce")
    parser.add_argument("--runners", type=int, help="runner processes")
    parser.add_argument("--seconds", type=float, help="seconds of load and faults")
    parser.add_argument("--seed", type=int, help="seed of the random choices")
    parser.add_argument("--workdir", type=Path, help="folder for data and logs")
    parser.add_argument(
        "--keep", action="store_true", help="keep the folder even when the soak passes"
    )
    arguments = parser.parse_args()
    preset = CI if arguments.ci else FULL
    plan = Plan(
        events=arguments.events or preset.events,
        runners=arguments.runners or preset.runners,
        seconds=arguments.seconds or preset.seconds,
        drain_seconds=preset.drain_seconds,
        fault_gap=preset.fault_gap,
        lines=preset.lines,
        seed=arguments.seed if arguments.seed is not None else preset.seed,
    )
    configure_logging("WARNING")
    workdir = arguments.workdir or Path(tempfile.mkdtemp(prefix="runledger-soak-"))
    code = asyncio.run(soak(plan, workdir))
    if code == 0 and not arguments.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"soak: data and logs kept in {workdir}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
