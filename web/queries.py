"""The web tier's named SQL, loaded once from ``web/sql``.

``web.sql`` holds the reads of the API and pages and the writes of ingest;
``health.sql`` the delivery-health and metrics figures.
"""

from __future__ import annotations

from pathlib import Path

from core.database import Queries

SQL = Path(__file__).parent / "sql"

web_queries = Queries(SQL / "web.sql")
health_queries = Queries(SQL / "health.sql")
