"""Schema changes that stay out of ingest's way, for revisions to share.

Revisions that touch the hot tables (events, deliveries, command_delivery,
commands) must not queue behind a long transaction while holding up every
writer behind them. So every lock a revision asks for is bounded by
``lock_timeout``, and indexes are built with ``CREATE INDEX CONCURRENTLY``
outside the revision's transaction, which lets inserts carry on while the
index is built.

The bound is ``RUNLEDGER_MIGRATION_LOCK_TIMEOUT`` seconds (default 5). When
a concurrent build cannot get its locks in time it is retried a few times;
after that the revision fails with the database's lock error, leaving the
schema as it was apart from indexes already built, and can simply be run
again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.exc import DBAPIError

from core.errors import ConfigurationError

LOCK_TIMEOUT_VARIABLE = "RUNLEDGER_MIGRATION_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_SECONDS = 5.0
CONCURRENT_BUILD_ATTEMPTS = 3

# SQLSTATE lock_not_available: lock_timeout expired.
_LOCK_NOT_AVAILABLE = "55P03"


def lock_timeout_milliseconds() -> int:
    """The configured bound on every lock wait, in milliseconds."""
    raw = os.environ.get(LOCK_TIMEOUT_VARIABLE, "")
    if not raw:
        return int(DEFAULT_LOCK_TIMEOUT_SECONDS * 1000)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigurationError(
            f"{LOCK_TIMEOUT_VARIABLE}={raw!r} is not a positive number of "
            "seconds; set it like 5 or 0.5, or unset it for the default of 5"
        )
    return max(1, int(seconds * 1000))


def bound_lock_waits() -> None:
    """Bound lock waits for the rest of the revision's transaction."""
    op.execute(f"SET LOCAL lock_timeout = {lock_timeout_milliseconds()}")


def create_index_concurrently(
    name: str,
    table: str,
    columns: Sequence[str],
    *,
    using: str | None = None,
    where: str | None = None,
) -> None:
    """Build an index without blocking writers, outside the transaction.

    A build left invalid by an earlier failed attempt is dropped first, so a
    rerun of the revision finishes the job. Raises the database error when the
    locks cannot be had within the timeout after a few attempts.
    """
    with op.get_context().autocommit_block():
        op.execute(f"SET lock_timeout = {lock_timeout_milliseconds()}")
        try:
            _with_retries(
                lambda: _build_index(name, table, columns, using, where),
            )
        finally:
            op.execute("RESET lock_timeout")


def drop_index_concurrently(name: str) -> None:
    """Drop an index without blocking writers, outside the transaction."""
    with op.get_context().autocommit_block():
        op.execute(f"SET lock_timeout = {lock_timeout_milliseconds()}")
        try:
            _with_retries(
                lambda: op.drop_index(
                    name, postgresql_concurrently=True, if_exists=True
                ),
            )
        finally:
            op.execute("RESET lock_timeout")


def _build_index(
    name: str,
    table: str,
    columns: Sequence[str],
    using: str | None,
    where: str | None,
) -> None:
    # CREATE INDEX CONCURRENTLY leaves an invalid index behind when it fails;
    # IF NOT EXISTS would then skip it for good.
    if _index_is_invalid(name):
        op.drop_index(name, postgresql_concurrently=True, if_exists=True)
    op.create_index(
        name,
        table,
        list(columns),
        postgresql_concurrently=True,
        if_not_exists=True,
        postgresql_using=using,
        postgresql_where=None if where is None else sa.text(where),
    )


def _index_is_invalid(name: str) -> bool:
    if op.get_context().as_sql:
        return False
    invalid = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT NOT indisvalid FROM pg_index "
                "WHERE indexrelid = to_regclass(:name)"
            ),
            {"name": name},
        )
        .scalar()
    )
    return bool(invalid)


def _with_retries(step: Callable[[], None]) -> None:
    for attempt in range(1, CONCURRENT_BUILD_ATTEMPTS + 1):
        try:
            step()
            return
        except DBAPIError as error:
            sqlstate = getattr(error.orig, "sqlstate", None)
            if sqlstate != _LOCK_NOT_AVAILABLE or attempt == CONCURRENT_BUILD_ATTEMPTS:
                raise
            # Let whatever held the lock finish before asking again.
            time.sleep(attempt)
