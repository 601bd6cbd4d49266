"""Sending one signed delivery to the relay's HTTP sink, and judging the answer.

This is the one place where httpx errors become :class:`DeliveryError`:

- 2xx: delivered.
- 429 and 503: retried, and the sink is paused for everyone (Retry-After).
- 408, other 5xx, timeouts and connection failures: retried.
- any other status (most 4xx, unexpected 3xx): permanent, the command is
  parked dead until someone replays it.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from broker.backoff import parse_retry_after
from core.errors import DeliveryError
from core.signing import sign

RETRIED_CLIENT_STATUSES = frozenset({408, 429})

# A sink's error body is kept for the operator, but never more than this.
ERROR_BODY_LIMIT = 300


class SinkClient:
    """Posts signed delivery bodies to one sink URL over reused connections."""

    def __init__(
        self, url: str, secret: str, timeout: float, max_connections: int
    ) -> None:
        self.url = url
        self._secret = secret.encode()
        self._timeout = timeout
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
            ),
        )

    async def deliver(self, delivery_id: str, body: bytes) -> int:
        """POST ``body`` as delivery ``delivery_id``; return the 2xx status.

        Raises DeliveryError: ``permanent`` for answers a retry cannot fix,
        ``retry_after`` in seconds when the sink asked for a pause.
        """
        headers = sign(self._secret, delivery_id, body)
        headers["content-type"] = "application/json"

        # httpx's timeout applies per read; the deadline bounds the whole request.
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._client.post(
                    self.url, content=body, headers=headers
                )
        except TimeoutError as error:
            raise DeliveryError(
                f"sink did not answer within {self._timeout:g} s"
            ) from error
        except httpx.TimeoutException as error:
            raise DeliveryError(
                f"sink did not answer within {self._timeout:g} s"
            ) from error
        except httpx.HTTPError as error:
            raise DeliveryError(
                f"could not reach the sink: {type(error).__name__}: {error}"
            ) from error

        status = response.status_code
        if 200 <= status < 300:
            return status

        reason = f"sink answered {status}: {_error_text(response)}"
        retry_after = parse_retry_after(
            response.headers.get("retry-after"), time.time()
        )
        if status >= 500 or status in RETRIED_CLIENT_STATUSES:
            raise DeliveryError(reason, status=status, retry_after=retry_after)
        raise DeliveryError(reason, status=status, permanent=True)

    async def close(self) -> None:
        """Close the pooled connections."""
        await self._client.aclose()


def _error_text(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    if len(text) > ERROR_BODY_LIMIT:
        text = text[:ERROR_BODY_LIMIT] + "..."
    return text or response.reason_phrase
