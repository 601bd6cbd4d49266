"""Services run on uvloop where it is installed."""

from __future__ import annotations

import asyncio

import pytest

from core.loop import run_event_loop


def test_runs_the_coroutine_and_returns_its_result() -> None:
    """The coroutine's return value comes back to the caller."""

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert run_event_loop(answer()) == 42


def test_uses_uvloop_when_installed() -> None:
    """The loop that runs the coroutine is uvloop's."""
    uvloop = pytest.importorskip("uvloop")

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert run_event_loop(loop_type()) is uvloop.Loop
