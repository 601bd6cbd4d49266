"""Signed deliveries, in the style of the Standard Webhooks spec.

A delivery carries three headers: ``webhook-id`` (stable across retries),
``webhook-timestamp`` (Unix seconds) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``). The sink recomputes the
signature with the shared secret, compares in constant time and rejects
timestamps outside a tolerance, which stops replays of old deliveries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

from core.errors import AuthenticationError

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
DEFAULT_TOLERANCE_SECONDS = 300


def _signature(secret: bytes, delivery_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign(
    secret: bytes, delivery_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """The three headers that sign ``body`` as delivery ``delivery_id``."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        ID_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: _signature(secret, delivery_id, timestamp, body),
    }


def verify(
    secret: bytes,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_seconds: int = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> str:
    """Check a delivery's signature and age; return its delivery id.

    Raises AuthenticationError naming what is wrong (missing header, stale
    timestamp, bad signature) without revealing the expected signature.
    """
    delivery_id = headers.get(ID_HEADER)
    timestamp_text = headers.get(TIMESTAMP_HEADER)
    signatures = headers.get(SIGNATURE_HEADER)
    if not delivery_id or not timestamp_text or not signatures:
        raise AuthenticationError("delivery is missing its signature headers")

    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise AuthenticationError("delivery timestamp is not an integer") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_seconds:
        raise AuthenticationError("delivery timestamp is outside the tolerance")

    # The header may hold several space-separated signatures (key rotation).
    expected = _signature(secret, delivery_id, timestamp, body)
    for candidate in signatures.split():
        if hmac.compare_digest(candidate.encode(), expected.encode()):
            return delivery_id
    raise AuthenticationError("delivery signature does not match")
