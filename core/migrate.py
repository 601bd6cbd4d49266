"""Running the alembic revisions from code (the command line and the tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from core.database import redact_url
from core.logging import get_logger

log = get_logger("migrate")

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    """An alembic Config for ``url``, independent of the working directory."""
    ini = ROOT / "alembic.ini"
    config = Config(str(ini)) if ini.exists() else Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    # alembic's ini interpolation treats % specially.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` to ``revision``; must not run inside a loop."""
    log.info("migrate.upgrading", database=redact_url(url), revision=revision)
    command.upgrade(alembic_config(url), revision)
    log.info("migrate.done", revision=revision)
