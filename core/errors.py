"""The one exception tree of runledger.

::

    RunledgerError
     ├── ConfigurationError     a setting has a wrong form or is missing
     ├── DatabaseError          Postgres could not be reached or refused us
     ├── ProtocolError          a wire message is malformed or breaks a limit
     │    └── LimitExceeded     a named limit (frame, batch, rate, ...) was hit
     ├── AuthenticationError    a token is missing, unknown or revoked
     ├── SpoolError             the runner's on-disk spool cannot be used
     └── DeliveryError          a sink refused or failed a delivery

Driver errors (asyncpg, websockets, httpx) are translated into these at the
boundary where they are caught, with the original chained by ``from``.
"""

from __future__ import annotations


class RunledgerError(Exception):
    """Base of every error runledger raises on purpose."""


class ConfigurationError(RunledgerError):
    """A setting is missing or has the wrong form; the message says the right form."""


class DatabaseError(RunledgerError):
    """Postgres could not be reached, or refused an operation."""


class ProtocolError(RunledgerError):
    """A wire message could not be accepted.

    ``code`` is a stable machine key sent back to the peer; the message is a
    human sentence that names what was wrong without leaking internals.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class LimitExceeded(ProtocolError):
    """A configured limit was broken; the reason names the limit and its value."""


class AuthenticationError(RunledgerError):
    """A runner or API token is missing, unknown or does not match."""


class SpoolError(RunledgerError):
    """The runner's spool file cannot be opened, written or is over budget."""


class DeliveryError(RunledgerError):
    """A sink refused or failed a delivery.

    ``permanent`` tells the relay to park the command instead of retrying.
    """

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        permanent: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.permanent = permanent
        self.retry_after = retry_after
