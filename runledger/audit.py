"""``runledger audit`` and ``runledger prune``: proving delivery, and retention.

``audit`` reads the audit views (see ``docs/auditing.md``) in one snapshot
and prints the system totals, every runner, and each command that lost
events, is dead, or is stuck longer than ``--stuck-after`` (events pending,
or sent to its runner with no event back). It exits 1 when there is any such
command, so it can guard a deployment, and 0 when there is none. ``--json``
prints the same figures for scripts.

``prune`` runs one retention pass (see :mod:`core.retention`) and says what
it removed and what it kept and why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

import asyncpg

import core
from core.database import Queries, create_pool, redact_url
from core.errors import ConfigurationError, DatabaseError
from core.retention import PruneProgress, RetentionReport, RetentionSettings, prune_once
from core.settings import load_settings
from runledger.database import resolve_database_url

queries = Queries(Path(core.__file__).parent / "sql" / "audit.sql")

EXIT_HEALTHY = 0
EXIT_PROBLEMS = 1

DEFAULT_STUCK_AFTER_SECONDS = 300.0
DEFAULT_PROBLEM_LIMIT = 20

# What pg_export_snapshot returns, like 00000003-0000001B-1.
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+(-[0-9A-F]+)+")


@dataclass
class AuditResult:
    """Everything one audit read, from one snapshot."""

    stuck_after: timedelta
    system: dict[str, Any]
    runners: list[dict[str, Any]]
    commands_checked: int
    lost: int
    dead: int
    stuck: int
    problem_commands: list[dict[str, Any]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """True when nothing is lost, dead or stuck."""
        return not (self.lost or self.dead or self.stuck)

    def problems(self) -> list[str]:
        """What is wrong, as short phrases; empty when healthy."""
        found = []
        if self.lost:
            found.append(f"{self.lost} command{_plural(self.lost)} lost events")
        if self.dead:
            found.append(f"{self.dead} command{_plural(self.dead)} dead")
        if self.stuck:
            found.append(
                f"{self.stuck} command{_plural(self.stuck)} stuck (events pending, "
                f"or no answer from the runner) longer than "
                f"{format_duration(self.stuck_after)}"
            )
        return found


async def run_audit(
    pool: asyncpg.Pool,
    stuck_after: timedelta,
    limit: int = DEFAULT_PROBLEM_LIMIT,
    progress: Callable[[str], None] | None = None,
) -> AuditResult:
    """Read the audit views in one read-only snapshot and judge them.

    The three reads run in parallel on connections that share the snapshot
    (``pg_export_snapshot``), so the figures agree with each other and the
    audit takes as long as its slowest read. ``pool`` needs four connections.
    """
    tell = progress or (lambda _message: None)
    async with (
        pool.acquire() as connection,
        connection.transaction(isolation="repeatable_read", readonly=True),
    ):
        snapshot = await connection.fetchval("SELECT pg_export_snapshot()")
        if not _SNAPSHOT_ID.fullmatch(snapshot):
            raise DatabaseError(f"unexpected snapshot id from Postgres: {snapshot!r}")

        async def read(what: str, query: str, *arguments: object) -> list[Any]:
            started = time.monotonic()
            tell(f"checking {what}")
            async with (
                pool.acquire() as reader,
                reader.transaction(isolation="repeatable_read", readonly=True),
            ):
                # SET TRANSACTION takes no parameters; the id was checked above.
                await reader.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
                rows: list[Any] = await reader.fetch(query, *arguments)
            took = timedelta(seconds=time.monotonic() - started)
            tell(f"checked {what} in {format_duration(took)}")
            return rows

        system_rows, runners, problem_commands = await asyncio.gather(
            read("system totals (audit_system)", queries.system_figures),
            read("runners (audit_runners)", queries.runner_figures),
            read(
                "every command for lost, dead and stuck events (audit_commands, "
                f"stuck after {format_duration(stuck_after)})",
                queries.problem_commands,
                stuck_after,
                limit,
            ),
        )
        system = system_rows[0] if system_rows else None

    # Lost and dead counts come with the system totals, from the same snapshot.
    system_figures = dict(system) if system is not None else {}
    return AuditResult(
        stuck_after=stuck_after,
        system=system_figures,
        runners=[dict(row) for row in runners],
        commands_checked=system_figures.get("commands", 0),
        lost=system_figures.get("lost_commands", 0),
        dead=system_figures.get("dead_commands", 0),
        stuck=problem_commands[0]["stuck_commands"] if problem_commands else 0,
        problem_commands=[
            {key: value for key, value in row.items() if key != "stuck_commands"}
            for row in problem_commands
        ],
    )


# Formatting -------------------------------------------------------------------


def format_duration(value: timedelta | None) -> str:
    """A short human duration: ``350 ms``, ``4.2 s``, ``12 min``, ``3 h 5 min``."""
    if value is None:
        return "-"
    seconds = value.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        hours, rest = divmod(int(seconds), 3600)
        return f"{hours} h {rest // 60} min"
    return f"{seconds / 86400:.1f} d"


def format_count(value: int | Decimal | None) -> str:
    """A count with thousands separators, ``-`` for none."""
    return "-" if value is None else f"{int(value):,}"


def format_moment(value: datetime | None, now: datetime | None) -> str:
    """How long ago a moment was, or ``never``."""
    if value is None:
        return "never"
    if now is None:
        return value.isoformat(timespec="seconds")
    return format_duration(now - value) + " ago"


def render_table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], align: str
) -> list[str]:
    """Columns two spaces apart; ``align`` has ``l`` or ``r`` per column."""
    table = [list(headers), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = []
    for row in table:
        cells = [
            cell.ljust(width) if side == "l" else cell.rjust(width)
            for cell, width, side in zip(row, widths, align, strict=True)
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


GREEN, RED, RESET = "\033[32m", "\033[31m", "\033[0m"


def render_text(result: AuditResult, *, colour: bool = False) -> str:
    """The audit as readable text; ``colour`` paints the verdict for a terminal."""
    system = result.system
    now = system.get("checked_at")
    lines = ["System"]
    lines.append(
        f"  runners {format_count(system.get('runners'))} "
        f"({format_count(system.get('runners_connected'))} connected), "
        f"commands {format_count(system.get('commands'))} "
        f"({format_count(system.get('commands_active'))} active)"
    )
    lines.append(
        f"  events stored {format_count(system.get('events_stored'))}, "
        f"delivered {format_count(system.get('delivered_events'))}, "
        f"queue depth {format_count(system.get('queue_depth'))} "
        f"in {format_count(system.get('commands_waiting'))} "
        f"command{_plural(system.get('commands_waiting') or 0)}, "
        f"dead {format_count(system.get('dead_events'))}"
    )
    lines.append(
        f"  missing {format_count(system.get('missing_events'))}, "
        f"refused {format_count(system.get('events_refused'))} "
        f"(conflicts {format_count(system.get('conflicts_refused'))}), "
        f"gaps recorded {format_count(system.get('gaps_recorded'))}"
    )
    lines.append(
        f"  ingest {format_count(system.get('events_last_minute'))} events in the "
        f"last minute, {system.get('events_per_minute', 0)}/min over 15 min"
    )
    lines.append(
        f"  delivery lag in the last hour: p50 "
        f"{format_duration(system.get('lag_p50_last_hour'))}, max "
        f"{format_duration(system.get('lag_max_last_hour'))}; oldest pending "
        f"{format_duration(system.get('oldest_pending_age'))}"
    )

    lines += ["", "Runners"]
    if result.runners:
        lines += render_table(
            (
                "NAME",
                "LAST SEEN",
                "STORED",
                "DELIVERED",
                "PENDING",
                "DEAD",
                "MISSING",
                "REFUSED",
                "LAG P50",
                "LAG MAX",
                "LOST CMDS",
            ),
            (
                (
                    runner["runner_name"],
                    format_moment(runner["last_seen_at"], now),
                    format_count(runner["events_stored"]),
                    format_count(runner["delivered_events"]),
                    format_count(runner["pending_events"]),
                    format_count(runner["dead_events"]),
                    format_count(runner["missing_events"]),
                    format_count(runner["events_refused"]),
                    format_duration(runner["lag_p50"]),
                    format_duration(runner["lag_max"]),
                    format_count(runner["lost_commands"]),
                )
                for runner in result.runners
            ),
            align="llrrrrrrrrr",
        )
    else:
        lines.append("  no runners registered")

    lines += ["", f"Commands ({format_count(result.commands_checked)} checked)"]
    if result.problem_commands:
        lines += render_table(
            ("COMMAND", "RUNNER", "PROBLEM", "STORED", "PENDING", "DEAD", "DETAIL"),
            (_problem_row(command) for command in result.problem_commands),
            align="lllrrrl",
        )
        shown = len(result.problem_commands)
        total = result.lost + result.dead + result.stuck
        if shown < total:
            lines.append(f"  ... {shown} shown; raise --limit to see more")
    else:
        lines.append("  none lost, dead or stuck")

    lines.append("")
    if result.healthy:
        verdict, paint = "OK: nothing lost, dead or stuck", GREEN
    else:
        verdict, paint = "FAILED: " + "; ".join(result.problems()), RED
    lines.append(f"{paint}{verdict}{RESET}" if colour else verdict)
    return "\n".join(lines) + "\n"


def _problem_row(command: Mapping[str, Any]) -> tuple[str, ...]:
    problems = [
        name
        for name, present in (
            ("lost", command["lost"]),
            ("dead", command["dead"]),
            ("stuck", command["stuck"]),
        )
        if present
    ]
    details = []
    if command["missing_ranges"]:
        details.append(f"missing {command['missing_ranges']}")
    if command["verification_matched"] is False:
        details.append("output did not verify")
    if command["dead"] and command["last_delivery_error"]:
        details.append(f"last error: {command['last_delivery_error']}")
    if command["stuck"] and command["oldest_pending_age"] is not None:
        details.append(
            f"oldest pending {format_duration(command['oldest_pending_age'])}"
        )
    if command["unanswered"]:
        details.append("sent to its runner, no event back")
    return (
        str(command["command_id"]),
        str(command["runner_name"]),
        ",".join(problems),
        format_count(command["events_stored"]),
        format_count(command["pending_events"]),
        format_count(command["dead_events"]),
        "; ".join(details),
    )


def to_json(result: AuditResult) -> str:
    """The audit as one JSON document; durations in seconds, moments ISO 8601."""
    document = {
        "healthy": result.healthy,
        "problems": result.problems(),
        "stuck_after_seconds": result.stuck_after.total_seconds(),
        "commands_checked": result.commands_checked,
        "lost_commands": result.lost,
        "dead_commands": result.dead,
        "stuck_commands": result.stuck,
        "system": result.system,
        "runners": result.runners,
        "problem_commands": result.problem_commands,
    }
    return json.dumps(document, default=_json_value, indent=2, sort_keys=False) + "\n"


def _json_value(value: object) -> object:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _plural(count: int) -> str:
    return "" if count == 1 else "s"


# Command line -----------------------------------------------------------------


def _progress_printer(stream: TextIO) -> Callable[[str], None]:
    def tell(message: str) -> None:
        print(f"runledger audit: {message}", file=stream, flush=True)

    return tell


async def _audit(url: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    pool = await create_pool(url, min_size=1, max_size=4)
    try:
        result = await run_audit(
            pool,
            timedelta(seconds=args.stuck_after),
            args.limit,
            None if args.quiet else _progress_printer(err),
        )
    except asyncpg.PostgresError as error:
        raise _database_error(error) from error
    finally:
        await pool.close()

    if args.json:
        out.write(to_json(result))
    else:
        out.write(render_text(result, colour=out.isatty()))
    return EXIT_HEALTHY if result.healthy else EXIT_PROBLEMS


def _database_error(error: asyncpg.PostgresError) -> DatabaseError:
    """Translate a driver error, naming the fix when the schema is too old."""
    if isinstance(error, asyncpg.UndefinedTableError):
        return DatabaseError(
            f"{error}: the schema predates the audit views; run `runledger migrate`"
        )
    return DatabaseError(f"the audit could not read the database: {error}")


def audit_command(args: argparse.Namespace) -> int:
    """Handler of ``runledger audit``; raises ConfigurationError for bad flags."""
    if args.limit < 1 or args.stuck_after <= 0:
        raise ConfigurationError(
            "--limit must be at least 1 and --stuck-after a positive number of "
            "seconds, like --limit 20 --stuck-after 300"
        )
    url = args.database_url or resolve_database_url(quiet=args.quiet)
    return asyncio.run(_audit(url, args, sys.stdout, sys.stderr))


PROGRESS_EVERY_BATCHES = 100


def _prune_printer(stream: TextIO, dry_run: bool) -> Callable[[PruneProgress], None]:
    """Print one line per command decided, and a line per 100 batches of a
    large command, so a long pass shows it is moving."""
    removed: dict[str, int] = {}
    batches = 0

    def say(message: str) -> None:
        print(f"runledger prune: {message}", file=stream, flush=True)

    def tell(update: PruneProgress) -> None:
        nonlocal batches
        if update.step == "kept":
            say(f"kept {update.command_id}: {update.detail}")
        elif update.step == "done":
            if dry_run:
                say(f"would prune {update.command_id}")
            else:
                summary = ", ".join(
                    f"{rows:,} {step.replace('_', ' ')}"
                    for step, rows in removed.items()
                )
                say(f"pruned {update.command_id}: {summary or 'nothing stored'}")
            removed.clear()
            batches = 0
        else:
            removed[update.step] = removed.get(update.step, 0) + update.rows
            batches += 1
            if batches % PROGRESS_EVERY_BATCHES == 0:
                say(
                    f"{update.command_id}: {removed.get('events', 0):,} events "
                    "removed so far"
                )

    return tell


def render_prune_report(report: RetentionReport, dry_run: bool) -> str:
    """A summary of one retention pass."""
    verb = "would prune" if dry_run else "pruned"
    cutoff = report.cutoff.isoformat(timespec="seconds") if report.cutoff else "-"
    decided = (
        f"{verb} {report.commands_pruned:,} of {report.commands_examined:,} "
        f"commands finished before {cutoff} "
        f"({report.commands_kept:,} kept)\n"
    )
    if dry_run:
        return decided
    return decided + (
        f"removed {report.events_removed:,} events, "
        f"{report.deliveries_removed:,} deliveries, {report.gaps_removed:,} gaps, "
        f"{report.applied_deliveries_removed:,} applied-delivery marks "
        f"in {report.batches:,} batches of at most {report.largest_batch:,} rows\n"
    )


async def _prune(
    url: str, settings: RetentionSettings, args: argparse.Namespace, out: TextIO
) -> int:
    pool = await create_pool(url, min_size=1, max_size=2)
    try:
        report = await prune_once(
            pool,
            settings,
            None if args.quiet else _prune_printer(sys.stderr, args.dry_run),
            dry_run=args.dry_run,
        )
    except asyncpg.PostgresError as error:
        raise _database_error(error) from error
    finally:
        await pool.close()
    out.write(render_prune_report(report, args.dry_run))
    return 0


def prune_command(args: argparse.Namespace) -> int:
    """Handler of ``runledger prune``."""
    settings = load_settings(
        RetentionSettings,
        {
            "retention_days": args.retention_days,
            "retention_batch_size": args.batch_size,
        },
    )
    url = args.database_url or resolve_database_url(quiet=args.quiet)
    if not args.quiet:
        print(
            f"runledger prune: removing events of commands finished more than "
            f"{settings.retention_days:g} days ago from {redact_url(url)}, "
            f"{settings.retention_batch_size:,} rows per batch",
            file=sys.stderr,
        )
    return asyncio.run(_prune(url, settings, args, sys.stdout))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``runledger audit`` and ``runledger prune``."""
    audit = subparsers.add_parser(
        "audit",
        help="prove every event got through; exit 1 if any is lost, dead or stuck",
        description="Read the audit views and print system totals, every runner, "
        "and each command that lost events, is dead, or has events pending "
        "longer than --stuck-after. Exits 0 when nothing is wrong and 1 when "
        "something is, so it can guard a deployment.",
    )
    audit.add_argument(
        "--json", action="store_true", help="print one JSON document for scripts"
    )
    audit.add_argument(
        "--stuck-after",
        type=float,
        default=DEFAULT_STUCK_AFTER_SECONDS,
        metavar="SECONDS",
        help="seconds after which pending events, or a command its runner has "
        "not answered, count as stuck (default 300)",
    )
    audit.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_PROBLEM_LIMIT,
        metavar="N",
        help="list at most N problem commands (default 20); counts cover all",
    )
    _add_common_arguments(audit)
    audit.set_defaults(handler=audit_command)

    prune = subparsers.add_parser(
        "prune",
        help="remove events of old, finished, fully delivered commands once",
        description="Run one retention pass: remove the events, deliveries, gaps "
        "and applied-delivery marks of commands that finished before the "
        "retention period and whose every event was delivered. Commands with "
        "missing, undelivered or dead events are kept.",
    )
    prune.add_argument(
        "--retention-days",
        type=float,
        metavar="DAYS",
        help="keep commands finished within this many days "
        "(default RUNLEDGER_RETENTION_DAYS or 30)",
    )
    prune.add_argument(
        "--batch-size",
        type=int,
        metavar="ROWS",
        help="rows removed per transaction (default RUNLEDGER_RETENTION_BATCH_SIZE "
        "or 1000)",
    )
    prune.add_argument(
        "--dry-run",
        action="store_true",
        help="say which commands would be pruned, remove nothing",
    )
    _add_common_arguments(prune)
    prune.set_defaults(handler=prune_command)


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="Postgres to read (default DATABASE_URL, PG*, or the embedded server)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print only the result, no progress"
    )
