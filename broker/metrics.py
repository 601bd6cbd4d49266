"""The broker's Prometheus metrics, in the default registry.

They are created once per process, so several brokers in one process (the
tests) share them, and the relay's metrics appear on the same ``/metrics``
page when it runs in the broker process.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate_latest

EVENTS_RECEIVED = Counter(
    "runledger_broker_events_received",
    "Events read from runners' frames, before any check.",
)
EVENTS_STORED = Counter(
    "runledger_broker_events_stored", "Events newly committed to the events table."
)
EVENTS_DUPLICATE = Counter(
    "runledger_broker_events_duplicate",
    "Resent events that were already stored and were acknowledged again.",
)
EVENTS_CONFLICT = Counter(
    "runledger_broker_events_conflict",
    "Events whose key or id was stored with a different id or content.",
)
EVENTS_REFUSED = Counter(
    "runledger_broker_events_refused",
    "Events refused for good, by reason code.",
    ["code"],
)
FRAMES_REFUSED = Counter(
    "runledger_broker_frames_refused",
    "Whole frames answered with an error, by reason code.",
    ["code"],
)
SEQUENCE_GAPS = Counter(
    "runledger_broker_sequence_gaps",
    "Times an event arrived with sequences missing before it.",
)
OUT_OF_ORDER = Counter(
    "runledger_broker_out_of_order",
    "Events that arrived after a higher sequence of their command.",
)
ACKNOWLEDGE_LATENCY = Histogram(
    "runledger_broker_acknowledge_latency_seconds",
    "From reading a frame to sending its acknowledgement.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
COMMIT_BATCH_EVENTS = Histogram(
    "runledger_broker_commit_batch_events",
    "Events per group-commit transaction.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
COMMIT_SECONDS = Histogram(
    "runledger_broker_commit_seconds",
    "Duration of one group-commit transaction.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0),
)
COMMIT_FAILURES = Counter(
    "runledger_broker_commit_failures",
    "Group-commit transactions that failed and were retried or refused.",
)
INGEST_QUEUE_FRAMES = Gauge(
    "runledger_broker_ingest_queue_frames", "Frames waiting for the writer."
)
CONNECTED_RUNNERS = Gauge(
    "runledger_broker_connected_runners", "Runner connections open on this broker."
)
CONNECTIONS_REFUSED = Counter(
    "runledger_broker_connections_refused",
    "Upgrades refused, by reason code.",
    ["code"],
)
COMMANDS_DISPATCHED = Counter(
    "runledger_broker_commands_dispatched", "Command messages sent to runners."
)
CANCELS_SENT = Counter(
    "runledger_broker_cancels_sent", "Cancel messages sent to runners."
)


def render() -> tuple[bytes, str]:
    """The default registry in Prometheus text format, and its content type."""
    return _generate_latest(), CONTENT_TYPE_LATEST
