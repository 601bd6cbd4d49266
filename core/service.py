"""The shape every long-running part has, so ``runledger dev`` can compose them."""

from __future__ import annotations

from typing import Protocol


class Service(Protocol):
    """A part that starts, runs in the background of the event loop, and stops."""

    async def start(self) -> None:
        """Return once the service is ready (listening, connected, scanning)."""

    async def stop(self) -> None:
        """Stop within a bounded time, leaving nothing acknowledged unsaved."""
