"""Finding Postgres, connecting to it, and loading named SQL.

The database URL comes from ``DATABASE_URL``; failing that, the standard
``PG*`` variables (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD``,
``PGDATABASE``) describe it. With neither, the command line starts an embedded
server (see :mod:`core.embedded`).

SQL that matters lives in ``.sql`` files beside the code that runs it, as
blocks opened by ``-- name: query_name`` and a one-line ``-- `` description.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncpg

from core.errors import ConfigurationError, DatabaseError

_NAME_LINE = re.compile(r"^--\s*name:\s*(?P<name>[a-z_][a-z0-9_]*)\s*$")


def database_url_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The configured database URL, or None when nothing says where Postgres is."""
    environ = os.environ if environ is None else environ
    if environ.get("DATABASE_URL"):
        return normalise_url(environ["DATABASE_URL"])
    if not environ.get("PGHOST"):
        return None

    user = quote(environ.get("PGUSER", "postgres"), safe="")
    password = environ.get("PGPASSWORD")
    credentials = user + (":" + quote(password, safe="") if password else "")
    host = environ["PGHOST"]
    port = environ.get("PGPORT", "5432")
    database = environ.get("PGDATABASE", "postgres")
    if host.startswith("/"):
        return f"postgresql://{credentials}@/{database}?host={host}&port={port}"
    return f"postgresql://{credentials}@{host}:{port}/{database}"


def normalise_url(url: str) -> str:
    """A plain ``postgresql://`` URL, whatever driver suffix it came with."""
    for prefix in ("postgresql+asyncpg://", "postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    if not url.startswith("postgresql://"):
        raise ConfigurationError(
            f"database URL must start with postgresql://, got {redact_url(url)!r}"
        )
    return url


def sqlalchemy_url(url: str) -> str:
    """The same URL with the asyncpg driver named, as SQLAlchemy wants it."""
    return "postgresql+asyncpg://" + normalise_url(url)[len("postgresql://") :]


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe to print or log."""
    return re.sub(r"(://[^:/@]+):[^@]+@", r"\1:***@", url)


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10
) -> asyncpg.Pool:
    """A connection pool; raises DatabaseError naming the (redacted) URL."""
    try:
        pool = await asyncpg.create_pool(
            normalise_url(url), min_size=min_size, max_size=max_size
        )
    except (OSError, asyncpg.PostgresError) as error:
        raise DatabaseError(
            f"cannot connect to Postgres at {redact_url(url)}: {error}"
        ) from error
    assert pool is not None
    return pool


async def connect(url: str) -> asyncpg.Connection:
    """One dedicated connection (for LISTEN, say); raises DatabaseError."""
    try:
        return await asyncpg.connect(normalise_url(url))
    except (OSError, asyncpg.PostgresError) as error:
        raise DatabaseError(
            f"cannot connect to Postgres at {redact_url(url)}: {error}"
        ) from error


@dataclass(frozen=True)
class Query:
    """One named statement from a ``.sql`` file."""

    name: str
    description: str
    sql: str


def load_queries(path: Path) -> dict[str, Query]:
    """Parse a ``.sql`` file into its named queries, in file order."""
    queries: dict[str, Query] = {}
    name: str | None = None
    description = ""
    lines: list[str] = []

    def finish() -> None:
        if name is not None:
            queries[name] = Query(name, description, "\n".join(lines).strip())

    for line in path.read_text(encoding="utf-8").splitlines():
        match = _NAME_LINE.match(line)
        if match:
            finish()
            name, description, lines = match["name"], "", []
        elif (
            name is not None and not lines and not description and line.startswith("--")
        ):
            description = line.lstrip("-").strip()
        elif name is not None:
            lines.append(line)
    finish()
    return queries


class Queries:
    """Attribute access to the named queries of one ``.sql`` file, loaded once."""

    def __init__(self, path: Path) -> None:
        self._queries = load_queries(path)

    def __getattr__(self, name: str) -> str:
        try:
            return self._queries[name].sql
        except KeyError:
            raise AttributeError(name) from None

    def __contains__(self, name: str) -> bool:
        return name in self._queries
