"""The runner daemon's settings: flags, then ``RUNLEDGER_*`` variables, defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigurationError
from core.settings import setting

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class RunnerSettings:
    """How the runner reaches its broker, spools events and runs children."""

    broker_url: str = setting(
        "ws://127.0.0.1:8765", "WebSocket URL of the broker (ws:// or wss://)."
    )
    token: str | None = setting(
        None, "The runner's token, from `runledger runner add NAME`."
    )
    # A Path default is immutable; ruff cannot tell that setting() is a field.
    ca_bundle: Path | None = setting(
        None, "PEM file of CAs that verify a wss:// broker (system CAs if unset)."
    )
    spool_path: Path = setting(
        Path(".runledger") / "runner-spool.sqlite3",
        "SQLite file holding every event until the broker acknowledges it.",
    )
    spool_bytes_limit: int = setting(
        GIB, "Disk budget of the spool; when full, the child's pipes are not read."
    )
    spool_synchronous: str = setting(
        "NORMAL",
        "SQLite synchronous mode: NORMAL survives a crash of the runner, "
        "FULL also a power cut, at a cost in throughput.",
    )
    window_events: int = setting(
        2000, "Most events sent and not yet acknowledged at any time."
    )
    window_bytes: int = setting(
        16 * MIB, "Most output bytes sent and not yet acknowledged at any time."
    )
    chunk_bytes: int = setting(
        64 * 1024, "Largest output chunk per event (lowered to fit the broker)."
    )
    chunk_seconds: float = setting(
        0.05, "How long output may wait to be joined into a bigger chunk."
    )
    acknowledge_timeout: float = setting(
        5.0, "Seconds to wait for an acknowledgement before resending an event."
    )
    acknowledge_timeout_max: float = setting(
        60.0, "Longest wait between resends of an event never acknowledged."
    )
    reconnect_initial: float = setting(
        0.5, "First delay before reconnecting; doubles on each failure."
    )
    reconnect_max: float = setting(30.0, "Longest delay between reconnect attempts.")
    ping_interval: float = setting(
        10.0, "Seconds between keepalive pings to the broker."
    )
    ping_timeout: float = setting(
        10.0, "Seconds without a pong after which the connection counts as dead."
    )
    open_timeout: float = setting(10.0, "Seconds allowed to open the WebSocket.")
    hello_timeout: float = setting(
        5.0,
        "Seconds to wait for the broker's hello before taking it for an older "
        "broker that sends none (and using default limits).",
    )
    compression: bool = setting(
        True, "Offer per-message deflate to the broker (less bandwidth, more CPU)."
    )
    cancel_grace: float = setting(
        10.0, "Seconds between TERM and KILL when a command is cancelled."
    )
    stop_flush_seconds: float = setting(
        5.0, "On stop, how long to wait for the broker to acknowledge what is left."
    )

    def validate(self) -> None:
        """Raise ConfigurationError naming the setting and its right form."""
        if not self.broker_url.startswith(("ws://", "wss://")):
            raise ConfigurationError(
                f"RUNLEDGER_BROKER_URL={self.broker_url!r} must start with "
                "ws:// or wss://"
            )
        if self.ca_bundle is not None and not self.broker_url.startswith("wss://"):
            raise ConfigurationError(
                "RUNLEDGER_CA_BUNDLE only applies to a wss:// broker URL"
            )
        if self.spool_synchronous.upper() not in ("NORMAL", "FULL"):
            raise ConfigurationError(
                "RUNLEDGER_SPOOL_SYNCHRONOUS must be NORMAL or FULL"
            )
        positive = {
            "spool_bytes_limit": self.spool_bytes_limit,
            "window_events": self.window_events,
            "window_bytes": self.window_bytes,
            "chunk_bytes": self.chunk_bytes,
            "acknowledge_timeout": self.acknowledge_timeout,
            "reconnect_initial": self.reconnect_initial,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigurationError(
                    f"RUNLEDGER_{name.upper()} must be greater than 0, got {value}"
                )
        if self.spool_bytes_limit < 4 * self.chunk_bytes:
            raise ConfigurationError(
                "RUNLEDGER_SPOOL_BYTES_LIMIT must hold at least four chunks "
                f"({4 * self.chunk_bytes} bytes)"
            )
