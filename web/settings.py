"""Settings of the web tier: where it listens, and the secrets it checks.

Read with :func:`core.settings.load_settings`: flags, then ``RUNLEDGER_*``
variables, then the defaults below. The signing secret is shared with the
relay (it signs what the web tier's ingest verifies); the API token guards
submitting, cancelling and replaying. Neither is ever logged or shown.
"""

from __future__ import annotations

import dataclasses
import secrets

from core.errors import ConfigurationError
from core.settings import setting
from core.tokens import hash_token


def _secret(doc: str) -> str | None:
    # Secrets stay out of repr(), so a settings object can be logged safely.
    return dataclasses.field(default=None, repr=False, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class WebSettings:
    """How the web tier is run; every field can be set by RUNLEDGER_<NAME>."""

    host: str = setting("127.0.0.1", "address to listen on (loopback by default)")
    port: int = setting(8000, "port to listen on; 0 picks a free one")
    signing_secret: str | None = _secret(
        "secret shared with the relay; deliveries must be signed with it"
    )
    api_token: str | None = _secret(
        "token that allows submitting, cancelling and replaying (Bearer header)"
    )
    api_token_hash: str | None = _secret(
        "SHA-256 hex of the API token, instead of the token itself"
    )
    timestamp_tolerance_seconds: int = setting(
        300, "deliveries signed further than this from now are refused"
    )
    long_poll_max_seconds: float = setting(
        30.0, "longest a read with ?wait= is held open"
    )
    page_limit_max: int = setting(1000, "most events one read API page returns")
    ingest_max_body_bytes: int = setting(
        64 * 1024 * 1024, "largest delivery body the ingest endpoint accepts"
    )
    session_hours: int = setting(12, "how long a sign-in on the pages lasts")
    cookie_secret: str | None = _secret(
        "key for the CSRF and sign-in cookies; random per process when unset"
    )
    graceful_shutdown_seconds: float = setting(
        5.0, "how long stopping waits for requests in flight"
    )

    def validate(self) -> None:
        """Raise ConfigurationError naming the variable whose value is wrong."""
        if not self.signing_secret:
            raise ConfigurationError(
                "RUNLEDGER_SIGNING_SECRET is not set: the web tier verifies every "
                "delivery from the relay with it; set the same value for both "
                "(for example the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(
                f"RUNLEDGER_PORT={self.port} is not a port; use 0-65535"
            )
        if self.timestamp_tolerance_seconds <= 0:
            raise ConfigurationError(
                "RUNLEDGER_TIMESTAMP_TOLERANCE_SECONDS must be a positive number "
                "of seconds"
            )
        if self.long_poll_max_seconds < 0 or self.page_limit_max < 1:
            raise ConfigurationError(
                "RUNLEDGER_LONG_POLL_MAX_SECONDS must be >= 0 and "
                "RUNLEDGER_PAGE_LIMIT_MAX >= 1"
            )
        if self.api_token_hash is not None and len(self.api_token_hash) != 64:
            raise ConfigurationError(
                "RUNLEDGER_API_TOKEN_HASH must be the 64-digit SHA-256 hex of the "
                "token (see `runledger web --help`)"
            )

    def signing_key(self) -> bytes:
        """The signing secret as bytes; raises ConfigurationError when unset."""
        if not self.signing_secret:
            self.validate()
        assert self.signing_secret is not None
        return self.signing_secret.encode()

    def control_token_hash(self) -> str | None:
        """The stored form of the API token, or None when control is off."""
        if self.api_token_hash:
            return self.api_token_hash.lower()
        if self.api_token:
            return hash_token(self.api_token)
        return None

    def cookie_key(self) -> str:
        """The configured cookie key, or a fresh random one."""
        return self.cookie_secret or secrets.token_urlsafe(32)
