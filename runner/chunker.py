"""Cutting a child's output into event-sized chunks, by size and by time.

Pure logic, no I/O: the reader feeds bytes in with the current time and gets
back the chunks that are ready. A chunk is ready when it reaches the size
limit, or when its first byte has waited ``window_seconds``, so a chatty child
makes few large events and a quiet one still shows up promptly.
"""

from __future__ import annotations

from core.wire import Limits

# JSON around one event's data (ids, kind, stream, time, keys): generous, so an
# event whose data fits the computed chunk size always fits the broker's limit.
EVENT_OVERHEAD_BYTES = 1024
FRAME_OVERHEAD_BYTES = 64


def base64_length(size: int) -> int:
    """Bytes that ``size`` bytes of data take once base64-encoded."""
    return 4 * ((size + 2) // 3)


def largest_chunk_for(limits: Limits, configured: int) -> int:
    """The biggest data size whose event fits ``limits``, capped at ``configured``.

    Base64 turns 3 bytes into 4, so the data of an event may be only about
    three quarters of the event size the broker allows. Raises ValueError if
    the limits leave no room for any data.
    """
    event_room = min(
        limits.max_event_bytes - EVENT_OVERHEAD_BYTES,
        limits.max_frame_bytes - EVENT_OVERHEAD_BYTES - FRAME_OVERHEAD_BYTES,
    )
    largest = (event_room // 4) * 3
    if largest <= 0:
        raise ValueError(
            f"broker limits {limits} leave no room for output data in an event"
        )
    return min(configured, largest)


class Chunker:
    """Joins the output of one stream into chunks of at most ``chunk_bytes``."""

    def __init__(self, chunk_bytes: int, window_seconds: float) -> None:
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.chunk_bytes = chunk_bytes
        self.window_seconds = window_seconds
        self._pending = bytearray()
        self._pending_since: float | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes held back, waiting for more output or for the window to end."""
        return len(self._pending)

    @property
    def deadline(self) -> float | None:
        """When the held-back bytes must go out, or None if nothing is held."""
        if self._pending_since is None:
            return None
        return self._pending_since + self.window_seconds

    def add(self, data: bytes, now: float) -> list[bytes]:
        """Take ``data`` in; return the full chunks now ready, oldest first."""
        if not data:
            return []
        if not self._pending:
            self._pending_since = now
        self._pending += data

        # Cut full chunks from the front; the rest waits for more or the window.
        ready = []
        while len(self._pending) >= self.chunk_bytes:
            ready.append(bytes(self._pending[: self.chunk_bytes]))
            del self._pending[: self.chunk_bytes]
        if not self._pending:
            self._pending_since = None
        return ready

    def due(self, now: float) -> bytes | None:
        """The held-back bytes if their window has ended, else None."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return None
        return self.flush()

    def flush(self) -> bytes | None:
        """Everything held back (end of stream), or None if nothing is held."""
        if not self._pending:
            return None
        chunk = bytes(self._pending)
        self._pending.clear()
        self._pending_since = None
        return chunk
