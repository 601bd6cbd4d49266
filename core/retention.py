"""Retention: removing the rows of old, finished, fully delivered commands.

A command is pruned when it finished (its status is final) longer ago than
``retention_days``, its relay state is not dead, no relay holds a live lease
on it, and the audit finds every stored event delivered, nothing missing and
its output verified (or not checked). Commands that lost events, or whose
events are undelivered or dead, are kept, whatever their age, for someone to
look at.

Pruning removes the command's events, deliveries, gaps and applied-delivery
marks in small batches, each its own short transaction, so no lock is held
for long and autovacuum can reuse the space. The commands row and its relay
state stay; ``pruned_commands`` records when and how much was removed, and
the audit views show such a command as pruned, never as lost. A pruning cut
short (a stop, a crash) is finished by the next run.

``prune_once`` runs one pass; ``run_retention_loop`` runs passes forever, for
a service to schedule.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import asyncpg

from core.database import Queries
from core.errors import ConfigurationError
from core.logging import get_logger
from core.settings import setting

log = get_logger("retention")

queries = Queries(Path(__file__).parent / "sql" / "retention.sql")

# SQLSTATE lock_not_available: a batch's lock wait ran out.
_LOCK_NOT_AVAILABLE = "55P03"


class RetentionConfig(Protocol):
    """What retention reads from a service's settings."""

    @property
    def retention_days(self) -> float: ...

    @property
    def retention_batch_size(self) -> int: ...

    @property
    def retention_interval(self) -> float: ...

    @property
    def retention_scan_size(self) -> int: ...

    @property
    def retention_lock_timeout(self) -> float: ...


@dataclass(frozen=True)
class RetentionSettings:
    """How long finished commands' events are kept, and how they are removed."""

    retention_days: float = setting(
        30.0, "keep events of finished, delivered commands this many days"
    )
    retention_batch_size: int = setting(
        1000, "rows removed per transaction; smaller holds locks for less time"
    )
    retention_interval: float = setting(
        600.0, "seconds between retention passes in a running service"
    )
    retention_scan_size: int = setting(
        500, "commands read per query while a pass looks for prunable ones"
    )
    retention_lock_timeout: float = setting(
        2.0, "seconds a batch may wait for a lock before that command is retried later"
    )

    def validate(self) -> None:
        """Raise ConfigurationError for values retention cannot work with."""
        validate_retention(self)


def validate_retention(config: RetentionConfig) -> None:
    """Raise ConfigurationError naming the setting and its right form."""
    if config.retention_days <= 0:
        raise ConfigurationError(
            f"RUNLEDGER_RETENTION_DAYS={config.retention_days} must be a positive "
            "number of days, like 30 or 0.5"
        )
    if config.retention_batch_size < 1:
        raise ConfigurationError(
            f"RUNLEDGER_RETENTION_BATCH_SIZE={config.retention_batch_size} must be "
            "a whole number of rows of at least 1, like 1000"
        )
    if config.retention_scan_size < 1:
        raise ConfigurationError(
            f"RUNLEDGER_RETENTION_SCAN_SIZE={config.retention_scan_size} must be "
            "a whole number of commands of at least 1, like 500"
        )
    if config.retention_interval <= 0 or config.retention_lock_timeout <= 0:
        raise ConfigurationError(
            "RUNLEDGER_RETENTION_INTERVAL and RUNLEDGER_RETENTION_LOCK_TIMEOUT "
            "must be positive numbers of seconds"
        )


@dataclass
class RetentionReport:
    """What one pass examined and removed."""

    cutoff: datetime | None = None
    commands_examined: int = 0
    commands_pruned: int = 0
    commands_kept: int = 0
    events_removed: int = 0
    deliveries_removed: int = 0
    gaps_removed: int = 0
    applied_deliveries_removed: int = 0
    batches: int = 0
    largest_batch: int = 0

    def add_batch(self, rows: int) -> None:
        self.batches += 1
        self.largest_batch = max(self.largest_batch, rows)


@dataclass(frozen=True)
class PruneProgress:
    """Reported after each batch and each decision, for progress output."""

    command_id: uuid.UUID
    step: str  # kept | events | deliveries | gaps | applied_deliveries | done
    rows: int
    detail: str = ""


ProgressCallback = Callable[[PruneProgress], None]


async def prune_once(
    pool: asyncpg.Pool,
    config: RetentionConfig,
    progress: ProgressCallback | None = None,
    *,
    dry_run: bool = False,
) -> RetentionReport:
    """Run one retention pass; return what it removed.

    With ``dry_run`` nothing is removed or recorded; the report counts the
    commands that would be pruned.

    Raises asyncpg errors other than a lock timeout (a command whose batch
    timed out waiting for a lock is left for the next pass).
    """
    validate_retention(config)
    report = RetentionReport()
    report.cutoff = await pool.fetchval("SELECT now()") - timedelta(
        days=config.retention_days
    )
    async for command_id, resuming in _candidates(pool, config, report.cutoff):
        report.commands_examined += 1
        try:
            if not resuming:
                reason = await _claim(pool, config, command_id, record=not dry_run)
                if reason is not None:
                    report.commands_kept += 1
                    log.debug(
                        "retention.kept", command_id=str(command_id), reason=reason
                    )
                    _tell(progress, PruneProgress(command_id, "kept", 0, reason))
                    continue
            if not dry_run:
                await _remove_rows(pool, config, command_id, report, progress)
        except asyncpg.PostgresError as error:
            if getattr(error, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            report.commands_kept += 1
            log.warning("retention.lock_timeout", command_id=str(command_id))
            _tell(progress, PruneProgress(command_id, "kept", 0, "lock timeout"))
            continue
        report.commands_pruned += 1
        _tell(progress, PruneProgress(command_id, "done", 0))

    # A pass that found nothing to do is not worth a line at INFO.
    log_pass = log.info if report.commands_examined else log.debug
    log_pass(
        "retention.pass_done",
        cutoff=report.cutoff.isoformat(),
        commands_pruned=report.commands_pruned,
        commands_kept=report.commands_kept,
        events_removed=report.events_removed,
        batches=report.batches,
    )
    return report


async def run_retention_loop(pool: asyncpg.Pool, config: RetentionConfig) -> None:
    """Run a retention pass every ``retention_interval`` seconds until cancelled.

    A failed pass is logged and retried at the next interval; it never ends
    the loop. Cancelling it mid-pass is safe: the next pass finishes the job.
    """
    validate_retention(config)
    log.info(
        "retention.started",
        retention_days=config.retention_days,
        interval=config.retention_interval,
    )
    while True:
        try:
            await prune_once(pool, config)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as error:
            log.warning("retention.pass_failed", error=str(error))
        await asyncio.sleep(config.retention_interval)


async def _candidates(
    pool: asyncpg.Pool, config: RetentionConfig, cutoff: datetime
) -> AsyncIterator[tuple[uuid.UUID, bool]]:
    """(command id, pruning already started) for every candidate, page by page.

    Paging by (finished_at, id) walks past commands that are kept, so a pile of
    them never hides the prunable ones behind.
    """
    after_finished_at = datetime.min.replace(tzinfo=UTC)
    after_id = uuid.UUID(int=0)
    while True:
        page = await pool.fetch(
            queries.find_candidates,
            cutoff,
            config.retention_scan_size,
            after_finished_at,
            after_id,
        )
        for row in page:
            yield row["command_id"], row["resuming"]
        if len(page) < config.retention_scan_size:
            return
        after_finished_at, after_id = page[-1]["finished_at"], page[-1]["command_id"]


async def _claim(
    pool: asyncpg.Pool,
    config: RetentionConfig,
    command_id: uuid.UUID,
    *,
    record: bool = True,
) -> str | None:
    """Record the command as being pruned if it is safe to; else say why not.

    Without ``record`` it only judges, for a dry run.
    """
    async with pool.acquire() as connection, connection.transaction():
        await _bound_lock_waits(connection, config)

        # Holding the relay's row keeps a relay from claiming the command
        # while it is judged; a live lease means it is being delivered now.
        state = await connection.fetchval(queries.lock_delivery_state, command_id)
        if state is None:
            return "a relay holds it"
        if state == "dead":
            return "delivery is dead"

        figures = await connection.fetchrow(queries.audit_figures, command_id)
        if figures is None:
            return "no audit figures"
        if figures["verification_matched"] is False:
            return "verification failed"
        if figures["lost"] or figures["missing_events"] > 0:
            return "events are missing"
        if figures["pending_events"] > 0 or figures["dead_events"] > 0:
            return "events are undelivered"
        if figures["delivered_events"] != figures["events_stored"]:
            return "events are undelivered"

        if record:
            await connection.execute(
                queries.start_pruning, command_id, figures["highest_sequence"]
            )
    return None


async def _remove_rows(
    pool: asyncpg.Pool,
    config: RetentionConfig,
    command_id: uuid.UUID,
    report: RetentionReport,
    progress: ProgressCallback | None,
) -> None:
    # Events first: while they go, the deliveries still vouch for the rest.
    report.events_removed += await _delete_in_batches(
        pool,
        config,
        command_id,
        "events",
        queries.delete_event_batch,
        progress,
        report,
        tally=True,
    )
    report.deliveries_removed += await _delete_in_batches(
        pool,
        config,
        command_id,
        "deliveries",
        queries.delete_delivery_batch,
        progress,
        report,
    )
    report.gaps_removed += await _delete_in_batches(
        pool, config, command_id, "gaps", queries.delete_gap_batch, progress, report
    )
    report.applied_deliveries_removed += await _delete_in_batches(
        pool,
        config,
        command_id,
        "applied_deliveries",
        queries.delete_applied_delivery_batch,
        progress,
        report,
    )
    await pool.execute(queries.finish_pruning, command_id)
    log.debug("retention.pruned", command_id=str(command_id))


async def _delete_in_batches(
    pool: asyncpg.Pool,
    config: RetentionConfig,
    command_id: uuid.UUID,
    step: str,
    query: str,
    progress: ProgressCallback | None,
    report: RetentionReport,
    *,
    tally: bool = False,
) -> int:
    """Run a batch ``DELETE`` until it removes nothing; return the rows removed.

    Each batch is its own transaction with bounded lock waits, so locks last
    as long as one batch.
    """
    total = 0
    while True:
        async with pool.acquire() as connection, connection.transaction():
            await _bound_lock_waits(connection, config)
            removed = _row_count(
                await connection.execute(query, command_id, config.retention_batch_size)
            )
            if removed and tally:
                await connection.execute(
                    queries.count_removed_events, command_id, removed
                )
        if not removed:
            return total
        total += removed
        report.add_batch(removed)
        _tell(progress, PruneProgress(command_id, step, removed))
        # Let other tasks at the pool between batches.
        await asyncio.sleep(0)


async def _bound_lock_waits(
    connection: asyncpg.Connection, config: RetentionConfig
) -> None:
    milliseconds = max(1, int(config.retention_lock_timeout * 1000))
    await connection.execute(f"SET LOCAL lock_timeout = {milliseconds}")


def _row_count(status: str) -> int:
    """The row count of a command status like ``DELETE 42``."""
    return int(status.rsplit(" ", 1)[-1])


def _tell(progress: ProgressCallback | None, update: PruneProgress) -> None:
    if progress is not None:
        progress(update)
