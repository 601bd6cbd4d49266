"""Faults at random moments, and the tally of what was injected.

Each fault is an async function of the cluster that does the damage and
undoes it (restarts what it killed, lifts the stall) before it returns, so
faults never pile up on one part. :class:`FaultInjector` picks one at random
after a random pause, until it is told to stop.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.soak.cluster import Cluster
from core.logging import get_logger

log = get_logger("soak")

Fault = Callable[[Cluster, random.Random], Awaitable[None]]


async def kill_broker(cluster: Cluster, chooser: random.Random) -> None:
    """SIGKILL the broker, then start it again on the same port."""
    assert cluster.broker is not None
    await cluster.broker.kill()
    await asyncio.sleep(chooser.uniform(0.5, 3))
    await cluster.broker.start()


async def kill_relay(cluster: Cluster, chooser: random.Random) -> None:
    """SIGKILL the relay, then start it again (its leases expire)."""
    assert cluster.relay is not None
    await cluster.relay.kill()
    await asyncio.sleep(chooser.uniform(0.5, 3))
    await cluster.relay.start()


async def kill_runner(cluster: Cluster, chooser: random.Random) -> None:
    """SIGKILL one runner (its child loses its reader), then start it again."""
    runner = chooser.choice(cluster.runners)
    await runner.process.kill()
    await asyncio.sleep(chooser.uniform(0.5, 3))
    await runner.process.start()


async def restart_postgres(cluster: Cluster, chooser: random.Random) -> None:
    """Restart the soak's own embedded Postgres (fast shutdown)."""
    await cluster.restart_postgres()


async def drop_connections(cluster: Cluster, chooser: random.Random) -> None:
    """Abort every runner connection at the proxy."""
    assert cluster.runner_proxy is not None
    cluster.runner_proxy.drop_all()


async def stall_connections(cluster: Cluster, chooser: random.Random) -> None:
    """Hold every byte between runners and broker for a few seconds."""
    assert cluster.runner_proxy is not None
    await cluster.runner_proxy.stall(chooser.uniform(2, 8))


def _sink_fault(mode: str) -> Fault:
    async def fault(cluster: Cluster, chooser: random.Random) -> None:
        assert cluster.sink_proxy is not None
        await cluster.sink_proxy.fault(mode, chooser.uniform(2, 8))

    fault.__doc__ = f"The sink answers {mode} for a few seconds."
    return fault


FAULTS: dict[str, Fault] = {
    "broker SIGKILL + restart": kill_broker,
    "relay SIGKILL + restart": kill_relay,
    "runner SIGKILL + restart": kill_runner,
    "Postgres restart": restart_postgres,
    "connection drop (proxy)": drop_connections,
    "connection stall (proxy)": stall_connections,
    "sink fails (503)": _sink_fault("fail"),
    "sink times out": _sink_fault("timeout"),
    "sink answers 429": _sink_fault("429"),
}


@dataclass
class FaultInjector:
    """Injects random faults every ``min_gap``..``max_gap`` seconds."""

    cluster: Cluster
    chooser: random.Random
    min_gap: float
    max_gap: float
    timeline: list[str] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Inject faults until :meth:`stop`; every kind at least once if time allows."""
        pending = list(FAULTS)
        self.chooser.shuffle(pending)
        while not self._stopping.is_set():
            pause = self.chooser.uniform(self.min_gap, self.max_gap)
            try:
                await asyncio.wait_for(self._stopping.wait(), pause)
                return
            except TimeoutError:
                pass
            # Every kind once, in random order, then any kind at random.
            name = pending.pop() if pending else self.chooser.choice(list(FAULTS))
            started = time.monotonic()
            began = time.strftime("%H:%M:%S", time.gmtime())
            try:
                await FAULTS[name](self.cluster, self.chooser)
                self.injected[name] += 1
                outcome = "done"
            except Exception as error:
                self.failed[name] += 1
                detail = getattr(error, "stderr", None) or b""
                outcome = f"failed: {error} {detail.decode(errors='replace').strip()}"
                log.error("soak.fault_failed", fault=name, error=str(error))
            self.timeline.append(
                f"{began} {name} ({time.monotonic() - started:.1f} s) {outcome}"
            )

    def every_kind_struck(self) -> bool:
        """Whether each kind of fault was tried at least once."""
        return all(self.injected[name] + self.failed[name] for name in FAULTS)

    def stop(self) -> None:
        self._stopping.set()
