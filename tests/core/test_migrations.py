"""The migrated schema is the one core.tables describes."""

from __future__ import annotations

import asyncpg

from core.tables import metadata


async def test_migrated_tables_match_the_models(pool: asyncpg.Pool) -> None:
    """Every table and column in core.tables exists after upgrade head."""
    rows = await pool.fetch(
        "SELECT c.table_name, c.column_name FROM information_schema.columns c "
        "JOIN information_schema.tables t USING (table_schema, table_name) "
        "WHERE c.table_schema = 'public' AND c.table_name <> 'alembic_version' "
        "AND t.table_type = 'BASE TABLE'"
    )
    migrated = {(r["table_name"], r["column_name"]) for r in rows}
    modelled = {
        (table.name, column.name)
        for table in metadata.sorted_tables
        for column in table.columns
    }
    assert migrated == modelled
