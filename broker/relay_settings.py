"""The outbox relay's settings: where to deliver, how hard to try, how to batch.

Read by :func:`core.settings.load_settings` from flags, then ``RUNLEDGER_*``
variables (``RUNLEDGER_SINK_URL``, ``RUNLEDGER_SIGNING_SECRET``,
``RUNLEDGER_RELAY_WORKERS``, ...), then the defaults below. Fields specific to
the relay carry a ``relay_`` prefix so their variables cannot be mistaken for
another service's.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigurationError
from core.settings import setting

DEFAULT_SINK_URL = "http://127.0.0.1:8000/api/runner/events"


@dataclass(frozen=True)
class RelaySettings:
    """How the relay forwards stored events to its sink."""

    sink_url: str = setting(
        DEFAULT_SINK_URL, "URL the relay POSTs deliveries to (the web tier's ingest)"
    )
    signing_secret: str | None = setting(
        None, "shared secret that signs every delivery (required)"
    )
    relay_workers: int = setting(5, "commands delivered in parallel")
    relay_batch_max_events: int = setting(500, "most events in one delivery")
    relay_batch_max_bytes: int = setting(
        1024 * 1024, "most output bytes in one delivery (one larger event still goes)"
    )
    relay_backoff_base: float = setting(1.0, "seconds before the first retry")
    relay_backoff_cap: float = setting(10.0, "longest backoff between retries, seconds")
    relay_max_attempts: int = setting(
        50, "failed tries of one delivery before the command is parked dead"
    )
    relay_max_age: float = setting(
        3600.0, "seconds of failing delivery before the command is parked dead"
    )
    relay_request_timeout: float = setting(10.0, "seconds one delivery may take")
    relay_lease_duration: float = setting(
        30.0, "seconds a worker holds a command it claimed before others may take it"
    )
    relay_gap_hold: float = setting(
        30.0, "seconds to wait for a missing sequence before skipping it as a gap"
    )
    relay_scan_interval: float = setting(
        1.0, "seconds between fallback scans for work, besides notifications"
    )
    relay_single_event_mode: bool = setting(
        False, "send one event per request, for sinks built for the predecessor"
    )
    relay_metrics_host: str = setting(
        "127.0.0.1", "address of the standalone relay's /metrics endpoint"
    )
    relay_metrics_port: int = setting(
        9102, "port of the standalone relay's /metrics endpoint (0 picks one)"
    )

    def validate(self) -> None:
        """Raise ConfigurationError naming the setting that is missing or wrong."""
        if not self.signing_secret:
            raise ConfigurationError(
                "the relay needs a signing secret: set RUNLEDGER_SIGNING_SECRET "
                "(the same value the web tier verifies deliveries with)"
            )
        if not self.sink_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"RUNLEDGER_SINK_URL must be an http:// or https:// URL, "
                f"got {self.sink_url!r}"
            )
        positive = {
            "RUNLEDGER_RELAY_WORKERS": self.relay_workers,
            "RUNLEDGER_RELAY_BATCH_MAX_EVENTS": self.relay_batch_max_events,
            "RUNLEDGER_RELAY_BATCH_MAX_BYTES": self.relay_batch_max_bytes,
            "RUNLEDGER_RELAY_BACKOFF_BASE": self.relay_backoff_base,
            "RUNLEDGER_RELAY_MAX_ATTEMPTS": self.relay_max_attempts,
            "RUNLEDGER_RELAY_REQUEST_TIMEOUT": self.relay_request_timeout,
            "RUNLEDGER_RELAY_SCAN_INTERVAL": self.relay_scan_interval,
        }
        for variable, value in positive.items():
            if value <= 0:
                raise ConfigurationError(f"{variable} must be above 0, got {value}")
        if self.relay_backoff_cap < self.relay_backoff_base:
            raise ConfigurationError(
                "RUNLEDGER_RELAY_BACKOFF_CAP must be at least "
                "RUNLEDGER_RELAY_BACKOFF_BASE"
            )
        # A worker holds its lease across one request; it must outlast it.
        if self.relay_lease_duration < 2 * self.relay_request_timeout:
            raise ConfigurationError(
                "RUNLEDGER_RELAY_LEASE_DURATION must be at least twice "
                f"RUNLEDGER_RELAY_REQUEST_TIMEOUT ({self.relay_request_timeout} s)"
            )
