"""Database URLs: from the environment, normalised, and safe to print."""

from __future__ import annotations

import pytest

from core.database import database_url_from_env, normalise_url, redact_url
from core.errors import ConfigurationError


def test_password_is_hidden_when_printed() -> None:
    """A password in a URL never reaches a log line."""
    redacted = redact_url("postgresql://app:s3cret@db:5432/runledger")
    assert "s3cret" not in redacted
    assert redacted == "postgresql://app:***@db:5432/runledger"


def test_url_without_password_is_left_alone() -> None:
    """An empty password is not shown as a masked one."""
    assert redact_url("postgresql://postgres:@/db?host=/run") == (
        "postgresql://postgres:@/db?host=/run"
    )


def test_pg_variables_describe_a_socket_server() -> None:
    """PGHOST naming a directory gives a Unix-socket URL."""
    url = database_url_from_env({"PGHOST": "/run/pg", "PGDATABASE": "x"})
    assert url == "postgresql://postgres@/x?host=/run/pg&port=5432"


def test_database_url_wins_over_pg_variables() -> None:
    """DATABASE_URL is used as given, with its driver suffix removed."""
    url = database_url_from_env(
        {"DATABASE_URL": "postgresql+asyncpg://u@h/d", "PGHOST": "other"}
    )
    assert url == "postgresql://u@h/d"


def test_other_schemes_are_refused_with_the_right_form() -> None:
    """A URL of another database says which form is expected."""
    with pytest.raises(ConfigurationError, match="postgresql://"):
        normalise_url("mysql://root@localhost/test")
