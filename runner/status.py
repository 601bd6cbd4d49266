"""The runner's figures for people: a live status line and ``runner --status``."""

from __future__ import annotations

from pathlib import Path

from runner.daemon import RunnerState
from runner.spool import RefusedEvent, Spool


def human_bytes(count: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def status_line(state: RunnerState) -> str:
    """One line: connected, running, spooled, unacknowledged, refused."""
    return (
        f"{'connected' if state.connected else 'disconnected'}"
        f" | running {state.running}"
        f" | spooled {state.spooled} ({human_bytes(state.spooled_bytes)})"
        f" | unacknowledged {state.unacknowledged}"
        f" | refused {state.refused}"
    )


def offline_state(spool: Spool) -> RunnerState:
    """The figures of a spool whose runner is not running.

    Nothing is in flight, so every spooled event counts as unacknowledged;
    commands without an exit event will be reported lost on the next start.
    """
    figures = spool.figures()
    return RunnerState(
        connected=False,
        running=figures.unfinished_commands,
        spooled=figures.spooled,
        spooled_bytes=figures.spooled_bytes,
        unacknowledged=figures.spooled,
        refused=figures.refused,
    )


def offline_report(path: Path, refused_shown: int = 5) -> str:
    """The text ``runledger runner --status`` prints for the spool at ``path``.

    Raises SpoolError when there is no readable spool there.
    """
    spool = Spool.open_read_only(path)
    running_now = Spool.in_use(path)
    try:
        state = offline_state(spool)
        refused = spool.refused_events(refused_shown)
    finally:
        spool.close()

    lines = [f"spool: {path}"]
    if running_now:
        lines += [
            "a runner is using this spool now: its own status line has the live "
            "figures; these are read from the file",
            f"running: {state.running}",
        ]
    else:
        lines += [
            "connected: no (the runner is not running)",
            f"running: {state.running} (commands that will be reported lost on start)",
        ]
    lines += [
        f"spooled: {state.spooled} events, {human_bytes(state.spooled_bytes)}",
        f"unacknowledged: {state.unacknowledged}",
        f"refused: {state.refused}",
    ]
    lines += [f"  {describe_refused(event)}" for event in refused]
    return "\n".join(lines)


def describe_refused(event: RefusedEvent) -> str:
    """One refused event as a line: which event, the code and the reason."""
    return (
        f"{event.command_id} #{event.sequence} ({event.kind}): "
        f"{event.code}: {event.reason}"
    )
