"""alembic environment: runs revisions on asyncpg through SQLAlchemy.

The URL comes from the ``sqlalchemy.url`` option when a caller set one (the
command line and the tests do), else from ``DATABASE_URL`` or ``PG*``.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from core.database import database_url_from_env, sqlalchemy_url
from core.errors import ConfigurationError
from core.tables import metadata

config = context.config
target_metadata = metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or database_url_from_env()
    if not url:
        raise ConfigurationError(
            "no database configured: set DATABASE_URL (or PGHOST), "
            "or run `runledger migrate`, which starts the embedded server"
        )
    return sqlalchemy_url(url)


def run_migrations_offline() -> None:
    """Print the SQL instead of running it (``alembic upgrade head --sql``)."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    """Run the revisions on one connection."""
    engine = create_async_engine(_url())
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
