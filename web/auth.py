"""Who may change things: the API token, and signed-in people on the pages.

API clients send ``Authorization: Bearer <token>``; the token is hashed and
compared with the stored hash in constant time. People sign in on the pages
once with the same token and get a short-lived cookie signed with the
cookie key (HttpOnly, SameSite=Lax); the page forms also carry Litestar's
CSRF token, so another site cannot post them.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from litestar import Request
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException

from core.tokens import token_matches

SESSION_COOKIE = "runledger_session"

CONTROL_OFF = (
    "control is off: start the web tier with RUNLEDGER_API_TOKEN (or "
    "RUNLEDGER_API_TOKEN_HASH) set to allow submitting and cancelling"
)


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if there is one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_allowed(token: str | None, control_token_hash: str | None) -> bool:
    """Whether ``token`` is the API token (constant-time comparison)."""
    if control_token_hash is None or token is None:
        return False
    return token_matches(token, control_token_hash)


def require_bearer(request: Request, control_token_hash: str | None) -> None:
    """Raise 403 when control is off, 401 when the bearer token is wrong."""
    if control_token_hash is None:
        raise PermissionDeniedException(CONTROL_OFF)
    if not token_allowed(bearer_token(request), control_token_hash):
        raise NotAuthorizedException(
            "send the API token as `Authorization: Bearer <token>`"
        )


def session_cookie_value(cookie_key: str, lifetime_seconds: int) -> str:
    """A signed cookie value valid for ``lifetime_seconds`` from now."""
    expires = int(time.time()) + lifetime_seconds
    return f"{expires}.{_sign(cookie_key, expires)}"


def signed_in(request: Request, cookie_key: str) -> bool:
    """Whether the request carries a valid, unexpired sign-in cookie."""
    value = request.cookies.get(SESSION_COOKIE, "")
    expires_text, _, signature = value.partition(".")
    if not expires_text.isdigit() or not signature:
        return False
    expires = int(expires_text)
    if expires < time.time():
        return False
    return hmac.compare_digest(signature, _sign(cookie_key, expires))


def _sign(cookie_key: str, expires: int) -> str:
    message = f"runledger-session.{expires}".encode()
    return hmac.new(cookie_key.encode(), message, hashlib.sha256).hexdigest()
