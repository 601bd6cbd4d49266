"""The broker's settings: flags, then ``RUNLEDGER_*`` variables, then defaults."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields
from pathlib import Path

from core.errors import ConfigurationError
from core.settings import setting

KIB = 1024
MIB = 1024**2


def default_broker_id() -> str:
    """``host:pid``, which names this broker process in the runners table."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker listens, the limits it enforces and how it commits."""

    host: str = setting("127.0.0.1", "Address the WebSocket server binds to.")
    port: int = setting(8765, "TCP port of the WebSocket server (0: any free port).")
    tls_cert: Path | None = setting(
        None, "PEM certificate chain; with tls_key the broker serves wss://."
    )
    tls_key: Path | None = setting(None, "PEM private key of tls_cert.")
    broker_id: str | None = setting(
        None, "Name of this broker in the runners table (default host:pid)."
    )
    max_frame_bytes: int = setting(
        MIB, "Largest frame accepted; bigger frames are refused with an error."
    )
    max_frame_bytes_hard: int = setting(
        16 * MIB,
        "Frames over this size close the connection (code 1009) instead of "
        "being read and refused.",
    )
    max_batch_events: int = setting(1000, "Most events in one `events` frame.")
    max_event_bytes: int = setting(
        256 * KIB, "Largest event (data plus payload bytes); bigger ones are refused."
    )
    max_events_per_second: int = setting(
        20000,
        "Events per second one connection may send; frames over the rate are "
        "refused with an error and may be resent.",
    )
    max_connections_per_runner: int = setting(
        4,
        "Connections of one runner open at once on this broker, the one in "
        "use and older ones still closing; more are refused at the upgrade.",
    )
    commit_max_events: int = setting(
        4000, "Most events the writer commits in one transaction."
    )
    commit_window_seconds: float = setting(
        0.0,
        "How long the writer waits for more events when a batch is small; 0 "
        "commits at once, and frames arriving meanwhile form the next batch.",
    )
    commits_in_flight: int = setting(
        2,
        "Group-commit transactions the writer keeps running at once (on as "
        "many connections); each command's events still commit in order.",
    )
    ingest_queue_frames: int = setting(
        512,
        "Frames waiting for the writer, over all connections (and as many "
        "more set aside behind a commit of their command); when full, "
        "connections stop being read.",
    )
    session_frames_in_flight: int = setting(
        16, "Frames of one connection waiting for their acknowledgement."
    )
    database_pool_size: int = setting(4, "Postgres connections besides LISTEN.")
    ping_interval: float = setting(
        20.0, "Seconds between WebSocket pings that detect dead peers."
    )
    seen_interval: float = setting(
        15.0, "Seconds between updates of connected runners' last_seen_at."
    )
    stop_timeout: float = setting(
        10.0, "Seconds `stop()` waits for connections and the writer to finish."
    )
    run_relay: bool = setting(
        False,
        "Also run the outbox relay in this process (--with-relay); it reads its "
        "own RUNLEDGER_* settings, RUNLEDGER_SIGNING_SECRET among them.",
    )
    run_retention: bool = setting(
        False,
        "Also prune events of old, finished, fully delivered commands on a "
        "schedule; reads the RUNLEDGER_RETENTION_* settings (see runledger prune).",
    )
    fault_crash_before_acknowledge: int = setting(
        0,
        "Tests only: drop this many connections after their events commit "
        "and before the acknowledgement is sent.",
    )

    @property
    def tls(self) -> bool:
        """Whether the broker serves wss:// itself."""
        return self.tls_cert is not None

    @property
    def name(self) -> str:
        """This broker's id, as written to ``runners.broker_id``."""
        return self.broker_id or default_broker_id()

    def validate(self) -> None:
        """Raise ConfigurationError naming a setting of the wrong form."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigurationError(
                "set both tls_cert and tls_key (RUNLEDGER_TLS_CERT, "
                "RUNLEDGER_TLS_KEY) to serve wss://, or neither to serve ws://"
            )
        for field in fields(self):
            value = getattr(self, field.name)
            positive = field.name.startswith(("max_", "commit_max", "ingest_"))
            positive |= field.name in (
                "session_frames_in_flight",
                "database_pool_size",
                "commits_in_flight",
            )
            if positive and (not isinstance(value, int) or value < 1):
                raise ConfigurationError(
                    f"{field.name} must be a positive integer, got {value!r}"
                )
        if self.max_frame_bytes > self.max_frame_bytes_hard:
            raise ConfigurationError(
                "max_frame_bytes must not exceed max_frame_bytes_hard "
                f"({self.max_frame_bytes} > {self.max_frame_bytes_hard})"
            )
        if self.max_events_per_second < self.max_batch_events:
            raise ConfigurationError(
                "max_events_per_second must be at least max_batch_events, or a "
                "full batch could never be accepted "
                f"({self.max_events_per_second} < {self.max_batch_events})"
            )
        if self.commit_window_seconds < 0:
            raise ConfigurationError("commit_window_seconds must be 0 or more")
