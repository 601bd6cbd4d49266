"""The benchmark's table, its targets, its JSON record and its plot."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.compare.measure import Result

LIMIT_SCENARIO = "limit: unnest insert"


@dataclass(frozen=True)
class Target:
    """One promise of issue 8, checked against the figures."""

    description: str
    measured: str
    met: bool | None


def ratio_to_limit(result: Result, results: list[Result]) -> float | None:
    """``result``'s throughput over the set-based insert limit's."""
    limit = _find(results, LIMIT_SCENARIO)
    if limit is None or limit.events_per_second == 0:
        return None
    return result.events_per_second / limit.events_per_second


def _find(results: list[Result], scenario: str) -> Result | None:
    return next((r for r in results if r.scenario == scenario), None)


def _starting(results: list[Result], prefix: str) -> list[Result]:
    return [r for r in results if r.scenario.startswith(prefix)]


def table(results: list[Result]) -> str:
    """A fixed-width table of every scenario."""
    header = (
        f"{'scenario':<58} {'events':>8} {'events/s':>10} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'CPU %':>6} {'peak MiB':>8} {'x limit':>7}  durability"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        ratio = ratio_to_limit(result, results)
        lines.append(
            f"{result.scenario[:58]:<58} {result.events:>8} "
            f"{result.events_per_second:>10,.0f} {_ms(result, result.p50_ms):>8} "
            f"{_ms(result, result.p99_ms):>8} {result.cpu_percent:>6.0f} "
            f"{result.peak_rss_mib:>8.0f} "
            f"{(f'{ratio:.2f}' if ratio is not None else '-'):>7}  {result.durability}"
        )
    return "\n".join(lines)


def markdown_table(results: list[Result]) -> str:
    """The same table in Markdown, for the documentation."""
    lines = [
        "| scenario | durability | events | events/s | p50 ms | p99 ms "
        "| CPU % | peak MiB | x limit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        ratio = ratio_to_limit(result, results)
        lines.append(
            f"| {result.scenario} | {result.durability} | {result.events:,} "
            f"| {result.events_per_second:,.0f} | {_ms(result, result.p50_ms)} "
            f"| {_ms(result, result.p99_ms)} | {result.cpu_percent:.0f} "
            f"| {result.peak_rss_mib:.0f} "
            f"| {f'{ratio:.2f}' if ratio is not None else '-'} |"
        )
    return "\n".join(lines)


def scale_markdown(results: list[Result]) -> str:
    """The scale runs in Markdown: throughput, latency and memory by setup."""
    lines = [
        "| setup | events/s | p50 ms | p99 ms | CPU % (all) | peak MiB (all) "
        "| broker MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        if result.group != "scale":
            continue
        broker = result.processes.get("broker", {}).get("peak_rss_mib", 0)
        lines.append(
            f"| {result.scenario.removeprefix('scale: ')} "
            f"| {result.events_per_second:,.0f} | {_ms(result, result.p50_ms)} "
            f"| {_ms(result, result.p99_ms)} | {result.cpu_percent:.0f} "
            f"| {result.peak_rss_mib:.0f} | {broker:.0f} |"
        )
    return "\n".join(lines)


def _ms(result: Result, value: float) -> str:
    return f"{value:.1f}" if result.latencies_ms else "-"


def targets(results: list[Result], main_ingest: str) -> list[Target]:
    """Issue 8's targets, each with its measured value and whether it is met."""
    checks: list[Target] = []
    ingest = _find(results, main_ingest)
    if ingest is None:
        return checks
    rate = ingest.events_per_second

    def compare(description: str, other: Result | None, factor: float) -> None:
        if other is None:
            checks.append(Target(description, "not measured", None))
            return
        ratio = rate / other.events_per_second if other.events_per_second else 0.0
        checks.append(Target(description, f"{ratio:.2f}x", ratio >= factor))

    limit = _find(results, LIMIT_SCENARIO)
    if limit is not None:
        share = rate / limit.events_per_second
        checks.append(
            Target(">= 40% of the set-based insert limit", f"{share:.0%}", share >= 0.4)
        )
    compare(">= 20x the old design", _find(results, "old design"), 20)
    for rabbit in _starting(results, "RabbitMQ"):
        compare(f">= 5x {rabbit.scenario} (equal durability)", rabbit, 5)
    jetstream = _find(results, "NATS JetStream, file, default sync")
    compare("no slower than JetStream default (not durable)", jetstream, 1)
    compare(">= 5x JetStream with sync on every message", None, 5)

    visible_runs = _starting(results, "runledger emit to visible")
    if not visible_runs:
        checks.append(Target("emit-to-visible p99 < 250 ms", "not measured", None))
    for visible in visible_runs:
        checks.append(
            Target(
                f"p99 < 250 ms: {visible.scenario[len('runledger ') :]}",
                f"{visible.p99_ms:.0f} ms at {visible.events_per_second:,.0f}/s",
                visible.p99_ms < 250,
            )
        )
    return checks


def targets_table(checks: list[Target]) -> str:
    """The targets as lines: met, missed or not measured."""
    verdicts = {True: "met", False: "MISSED", None: "n/a"}
    return "\n".join(
        f"{verdicts[check.met]:<7} {check.description:<58} {check.measured}"
        for check in checks
    )


def machine_context() -> dict[str, Any]:
    """What the figures were taken on."""
    return {
        "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def busy_processes(sample_seconds: float = 2.0, top: int = 8) -> list[str]:
    """What else is using the CPU right now: the busiest processes, briefly."""
    processes = list(psutil.process_iter(["pid", "name", "cmdline"]))
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.cpu_percent(None)
    time.sleep(sample_seconds)
    busy = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            share = process.cpu_percent(None)
            if share >= 1.0:
                # Three words say what it is; later ones might carry secrets.
                words = process.info["cmdline"] or [process.info["name"]]
                command = Path(words[0]).name + " "
                command += " ".join(words[1:3])
                busy.append((share, f"{share:.0f}% {command.strip()}"))
    busy.sort(reverse=True)
    return [line for _, line in busy[:top]]


def write_json(
    path: Path,
    results: list[Result],
    checks: list[Target],
    context: dict[str, Any],
    notes: list[str],
) -> None:
    """Write every figure, the targets and the context to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "context": context,
        "results": [
            {**r.as_dict(), "ratio_to_limit": _rounded(ratio_to_limit(r, results))}
            for r in results
        ],
        "targets": [
            {"target": c.description, "measured": c.measured, "met": c.met}
            for c in checks
        ],
        "notes": notes,
    }
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


GROUP_COLOURS = {
    "limit": "#4d4d4d",
    "ingest": "#1b7837",
    "delivery": "#5aae61",
    "baseline": "#b2182b",
    "alternatives": "#2166ac",
    "scale": "#7fbf7b",
}


def plot(path: Path, rows: list[dict[str, Any]], title: str) -> None:
    """Throughput of every scenario side by side, and the scale runs.

    ``rows`` are results as :meth:`Result.as_dict` gives them (and as the
    JSON record holds them), so a plot can be drawn again from a record.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["group"] != "scale"]
    scale = [r for r in rows if r["group"] == "scale"]
    figure, axes = plt.subplots(
        1,
        2 if scale else 1,
        figsize=(15 if scale else 10, 7),
        squeeze=False,
        gridspec_kw={"width_ratios": [2, 1]} if scale else None,
    )
    _draw_bars(axes[0][0], main, title)
    if scale:
        _draw_scale(axes[0][1], scale)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _draw_bars(bars: Any, rows: list[dict[str, Any]], title: str) -> None:
    labels = [
        "\n".join(textwrap.wrap(r["scenario"], 40)) + f"\n({r['durability']})"
        for r in rows
    ]
    values = [r["events_per_second"] for r in rows]
    colours = [GROUP_COLOURS.get(r["group"], "#999999") for r in rows]
    positions = list(range(len(rows)))[::-1]
    bars.barh(positions, values, color=colours)
    bars.set_yticks(positions, labels, fontsize=6.5)
    bars.set_xscale("log")
    bars.set_xlabel("events per second (log scale, higher is better)")
    for position, row in zip(positions, rows, strict=True):
        latency = f"  p99 {row['p99_ms']:,.0f} ms" if row["latency_samples"] else ""
        bars.text(
            row["events_per_second"] * 1.05,
            position,
            f"{row['events_per_second']:,.0f}/s{latency}",
            va="center",
            fontsize=7,
        )
    bars.set_xlim(right=max(values) * 8 if values else 1)
    bars.set_title(title, fontsize=9)


def _draw_scale(lines: Any, rows: list[dict[str, Any]]) -> None:
    single = [r for r in rows if r["parameters"].get("brokers", 1) == 1]
    connections = [int(r["parameters"].get("connections", 0)) for r in single]
    lines.plot(
        connections,
        [r["events_per_second"] for r in single],
        "o-",
        color=GROUP_COLOURS["ingest"],
        label="events/s, 1 broker",
    )
    for row in rows:
        if row["parameters"].get("brokers", 1) > 1:
            lines.plot(
                [int(row["parameters"].get("connections", 0))],
                [row["events_per_second"]],
                "s",
                color="#762a83",
                label="events/s, 2 brokers + 2 relays",
            )
    lines.set_xscale("log")
    lines.set_xlabel("runner connections")
    lines.set_ylabel("events per second")
    lines.set_ylim(bottom=0)

    memory = lines.twinx()
    memory.plot(
        connections,
        [r["processes"].get("broker", {}).get("peak_rss_mib", 0) for r in single],
        "^--",
        color="#999999",
        label="peak MiB, broker",
    )
    memory.set_ylabel("broker's peak private memory (MiB)")
    memory.set_ylim(bottom=0)
    handles, labels = lines.get_legend_handles_labels()
    extra_handles, extra_labels = memory.get_legend_handles_labels()
    lines.legend(
        handles + extra_handles, labels + extra_labels, fontsize=7, loc="lower right"
    )
    lines.set_title("runledger ingest by runner connections", fontsize=9)
