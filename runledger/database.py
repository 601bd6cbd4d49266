"""Where the command line finds Postgres: configured, or embedded."""

from __future__ import annotations

import sys

from core.database import database_url_from_env, redact_url
from core.embedded import DEFAULT_DATA_DIR, start_embedded_postgres


def resolve_database_url(*, quiet: bool = False) -> str:
    """``DATABASE_URL``/``PG*`` when set, else the project's embedded server."""
    url = database_url_from_env()
    if url:
        if not quiet:
            print(f"runledger: database {redact_url(url)}", file=sys.stderr)
        return url

    if not quiet:
        print(
            f"runledger: no DATABASE_URL set; using the embedded Postgres in "
            f"{DEFAULT_DATA_DIR}/",
            file=sys.stderr,
        )
    return start_embedded_postgres()
