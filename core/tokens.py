"""Runner and API tokens: made random, stored hashed, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

RUNNER_TOKEN_PREFIX = "rlr_"  # noqa: S105 (a prefix, not a secret)
API_TOKEN_PREFIX = "rla_"  # noqa: S105 (a prefix, not a secret)


def new_token(prefix: str = RUNNER_TOKEN_PREFIX) -> str:
    """A fresh token with 256 bits of randomness; shown once, never stored."""
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored and looked up."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Whether ``token`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_token(token), stored_hash)
