"""The relay's metrics, and the small HTTP endpoint of the standalone relay.

Metrics live in prometheus_client's default registry, so a broker that runs
the relay in-process exposes them on its own ``/metrics``. The standalone
relay serves them itself, plus ``/metrics.json``: a summary that keeps the
predecessor's names (``forwardingQueue.queued``, ``activeWorkers``,
``processing``) for existing dashboards.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from core.logging import get_logger

log = get_logger("relay")

queued_events = Gauge(
    "forwarding_queue_queued", "Events stored and not yet delivered to the sink"
)
active_workers = Gauge(
    "forwarding_active_workers", "Relay workers delivering a command right now"
)
processing = Gauge(
    "forwarding_processing", "1 while at least one relay worker is delivering"
)
deliveries = Counter(
    "runledger_relay_deliveries",
    "Delivery requests by result (delivered, retried, dead)",
    ["result"],
)
delivered_events = Counter(
    "runledger_relay_delivered_events", "Events delivered to the sink"
)
retries = Counter(
    "runledger_relay_retries", "Deliveries scheduled for another try after a failure"
)
dead_commands = Counter(
    "runledger_relay_dead_commands", "Commands parked dead after a failed delivery"
)
gaps_skipped = Counter(
    "runledger_relay_gaps", "Gaps in a command's sequences recorded and skipped"
)
late_events = Counter(
    "runledger_relay_late_events", "Events delivered late, after their gap was skipped"
)
delivery_lag = Histogram(
    "runledger_relay_lag_seconds",
    "Time from an event being stored to its delivery being confirmed",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

# A request line and headers larger than this are refused.
REQUEST_HEAD_LIMIT = 16 * 1024
REQUEST_READ_TIMEOUT = 10.0


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text) and ``/metrics.json`` over HTTP."""

    def __init__(
        self, host: str, port: int, summary: Callable[[], dict[str, Any]]
    ) -> None:
        self.host = host
        self.port = port
        self._summary = summary
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; ``.port`` is the bound port afterwards (port 0 picks one)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("relay.metrics_listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(REQUEST_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, content_type, body = self._answer(head)
            writer.write(
                f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, str, bytes]:
        if len(head) > REQUEST_HEAD_LIMIT:
            return "431 Request Header Fields Too Large", "text/plain", b""
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or parts[0] != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        path = parts[1].split("?", 1)[0]
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
        if path == "/metrics.json":
            body = json.dumps(self._summary(), indent=2).encode() + b"\n"
            return "200 OK", "application/json", body
        return "404 Not Found", "text/plain", b"try /metrics or /metrics.json\n"
