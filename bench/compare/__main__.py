"""``python -m bench.compare``: every scenario, one table, JSON and a plot.

Scenarios run one after another on the same machine. ``--quick`` moves a
tenth of the events and skips the largest scale runs, for a check in about
two minutes. Slow designs move a fraction of the workload (the first events
of the same list), which their row says; rates stay comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.compare import brokers, ingest, legacy, limit, report, runner_link
from bench.compare.measure import Result, Workload
from bench.compare.scratch import drop_leftovers
from core.logging import configure_logging
from core.loop import run_event_loop

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "bench" / "results"
PLOT_PATH = ROOT / "docs" / "performance.png"
MAIN_INGEST_CONNECTIONS = 10
SCALE_CONNECTIONS = (1, 10, 100, 500)

Scenario = Callable[[], Awaitable[list[Result]]]


def _one(coroutine: Callable[[], Awaitable[Result]]) -> Scenario:
    async def run() -> list[Result]:
        return [await coroutine()]

    return run


def scenarios(events: int, quick: bool) -> dict[str, Scenario]:
    """Every scenario by name, in the order they run."""
    full = Workload(events)
    fifth = Workload(events // 5)
    twentieth = Workload(max(events // 20, 1000))
    main_scenario = f"runledger ingest, {MAIN_INGEST_CONNECTIONS} connections"

    def with_note(result: Result, workload: Workload) -> Result:
        if workload.events_total < events:
            result.notes += f"; moved the first {workload.events_total:,} events"
        return result

    async def runledger_delivery() -> list[Result]:
        from bench.compare import delivery

        seconds = 4 if quick else 20
        return [
            await delivery.run_delivery(full),
            *await delivery.run_visible(full, seconds, reader_count=100),
            *await delivery.run_visible(full, seconds, reader_count=10),
        ]

    async def scale() -> list[Result]:
        results = []
        for connections in SCALE_CONNECTIONS[:3] if quick else SCALE_CONNECTIONS:
            results.append(
                await ingest.run_ingest(
                    full,
                    connections,
                    scenario=f"scale: {connections} connections, 1 broker",
                    group="scale",
                )
            )
        results.append(
            await ingest.run_ingest(
                full,
                100,
                brokers=2,
                relays=2,
                scenario="scale: 100 connections, 2 brokers, 2 relays",
                group="scale",
            )
        )
        return results

    async def rabbit(queue_type: str) -> Result:
        return with_note(await brokers.run_rabbitmq(fifth, queue_type), fifth)

    async def old_design() -> Result:
        return with_note(await legacy.run_legacy(twentieth), twentieth)

    return {
        "limit": lambda: limit.run_limit(full),
        "ingest": _one(
            lambda: ingest.run_ingest(
                full, MAIN_INGEST_CONNECTIONS, scenario=main_scenario
            )
        ),
        "links": _one(
            lambda: runner_link.run_runner_links(full, MAIN_INGEST_CONNECTIONS)
        ),
        "delivery": runledger_delivery,
        "old": _one(old_design),
        "jetstream": _one(lambda: brokers.run_jetstream(full)),
        "rabbitmq-classic": _one(lambda: rabbit("classic")),
        "rabbitmq-quorum": _one(lambda: rabbit("quorum")),
        "scale": scale,
    }


async def run(arguments: argparse.Namespace) -> int:
    events = arguments.events or (20_000 if arguments.quick else 200_000)
    chosen = scenarios(events, arguments.quick)
    names = arguments.only or list(chosen)
    results: list[Result] = []
    notes = [brokers.jetstream_sync_always_note()]
    failures = 0

    await drop_leftovers()
    busy_before = await asyncio.to_thread(report.busy_processes)
    for name in names:
        started = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            results.extend(await chosen[name]())
        except Exception as error:
            failures += 1
            notes.append(f"{name} failed: {type(error).__name__}: {error}")
            traceback.print_exc()
        print(
            f"bench: {name} done in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    main_ingest = f"runledger ingest, {MAIN_INGEST_CONNECTIONS} connections"
    checks = report.targets(results, main_ingest)
    context = report.machine_context()
    context.update(
        {
            "events": events,
            "quick": arguments.quick,
            "scenarios": names,
            "busy_before": busy_before,
            "busy_after": await asyncio.to_thread(report.busy_processes),
        }
    )
    print(report.table(results))
    print()
    print(report.targets_table(checks))
    for note in notes:
        print(f"note: {note}")

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    json_path = (
        RESULTS_DIR / f"compare-{stamp}{'-quick' if arguments.quick else ''}.json"
    )
    report.write_json(json_path, results, checks, context, notes)
    markdown_path = json_path.with_suffix(".md")
    markdown_path.write_text(
        report.markdown_table(results)
        + "\n\n"
        + report.scale_markdown(results)
        + "\n\n"
        + "\n".join(f"- {line}" for line in report.targets_table(checks).splitlines())
        + "\n",
        encoding="utf-8",
    )
    print(f"figures written to {json_path.relative_to(ROOT)} and .md")
    if not arguments.no_plot:
        plot_path = arguments.plot or PLOT_PATH
        report.plot(
            plot_path,
            [result.as_dict() for result in results],
            plot_title(context),
        )
        print(f"plot written to {plot_path}")
    return 1 if failures else 0


def plot_title(context: dict[str, Any]) -> str:
    """The plot's title: the workload and where and when it ran."""
    return (
        f"{context['events']:,} events of 200 bytes over 100 commands, "
        f"{context['cpus']} cores, {context['taken_at']}"
    )


def replot(record: Path, plot_path: Path) -> None:
    """Draw the plot of a recorded run again, without running anything."""
    body = json.loads(record.read_text(encoding="utf-8"))
    report.plot(plot_path, body["results"], plot_title(body["context"]))
    print(f"plot written to {plot_path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="a short run (~2 min)")
    parser.add_argument("--events", type=int, help="events in the workload")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SCENARIO",
        help="run only these: " + ", ".join(scenarios(1000, True)),
    )
    parser.add_argument("--plot", type=Path, help=f"plot path (default {PLOT_PATH})")
    parser.add_argument("--no-plot", action="store_true", help="draw no plot")
    parser.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="run nothing; draw the plot again from a recorded JSON file",
    )
    arguments = parser.parse_args()
    configure_logging("WARNING")
    if arguments.replot:
        replot(arguments.replot, arguments.plot or PLOT_PATH)
        return
    # Every process of the benchmark runs on the same loop as the services.
    sys.exit(run_event_loop(run(arguments)))


if __name__ == "__main__":
    main()
