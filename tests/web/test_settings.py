"""Web settings: the signing secret is required, secrets stay out of repr."""

from __future__ import annotations

import pytest

from core.errors import ConfigurationError
from core.settings import load_settings
from core.tokens import hash_token
from web.settings import WebSettings


def test_missing_signing_secret_is_a_clear_error() -> None:
    """Without RUNLEDGER_SIGNING_SECRET, loading fails and names the variable."""
    with pytest.raises(ConfigurationError, match="RUNLEDGER_SIGNING_SECRET"):
        load_settings(WebSettings, environ={})


def test_environment_sets_fields() -> None:
    """RUNLEDGER_* variables set the fields; flags win over them."""
    settings = load_settings(
        WebSettings,
        {"port": 9001},
        environ={
            "RUNLEDGER_SIGNING_SECRET": "s",
            "RUNLEDGER_PORT": "9000",
            "RUNLEDGER_API_TOKEN": "rla_x",
        },
    )
    assert settings.port == 9001
    assert settings.host == "127.0.0.1"
    assert settings.control_token_hash() == hash_token("rla_x")


def test_secrets_are_not_in_repr() -> None:
    """repr() of the settings never shows the secret or the token."""
    settings = WebSettings(signing_secret="very-secret", api_token="rla_token")
    assert "very-secret" not in repr(settings)
    assert "rla_token" not in repr(settings)


def test_token_hash_may_be_given_instead_of_the_token() -> None:
    """RUNLEDGER_API_TOKEN_HASH stands in for the token; a malformed one is refused."""
    digest = hash_token("rla_y")
    assert (
        WebSettings(signing_secret="s", api_token_hash=digest).control_token_hash()
        == digest
    )
    with pytest.raises(ConfigurationError, match="64-digit"):
        WebSettings(signing_secret="s", api_token_hash="abc").validate()


def test_control_is_off_without_a_token() -> None:
    """With neither token nor hash, there is no control token."""
    assert WebSettings(signing_secret="s").control_token_hash() is None
