"""The workload every scenario moves, and how a scenario is measured.

A :class:`Workload` is the same list of events for every scenario. A
:class:`ResourceMonitor` samples, on a thread, the CPU time and resident
memory of the processes a scenario involves (the load generator, the servers
it started, the Postgres backends of its database, a broker's server), so
the figures cover the whole path and not only this process.
"""

from __future__ import annotations

import os
import random
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil

EVENT_DATA_BYTES = 200
DEFAULT_COMMANDS = 100
SAMPLE_INTERVAL_SECONDS = 0.1


@dataclass(frozen=True)
class BenchEvent:
    """One output event of the workload."""

    command_id: uuid.UUID
    sequence: int
    id: uuid.UUID
    data: bytes


@dataclass(frozen=True)
class Workload:
    """``events_total`` events of 200 bytes over ``commands`` commands.

    Events are interleaved across commands (command 0 sequence 1, command 1
    sequence 1, ...), as concurrent commands produce them.
    """

    events_total: int
    commands: int = DEFAULT_COMMANDS
    seed: int = 8

    def command_ids(self) -> list[uuid.UUID]:
        """The commands' ids, stable for one seed."""
        chooser = random.Random(self.seed)
        return [
            uuid.UUID(int=chooser.getrandbits(128), version=4)
            for _ in range(self.commands)
        ]

    def events(self) -> list[BenchEvent]:
        """Every event, interleaved over the commands, sequences from 1."""
        chooser = random.Random(self.seed + 1)
        alphabet = (string.ascii_letters + string.digits + " ").encode()
        line = bytes(chooser.choice(alphabet) for _ in range(EVENT_DATA_BYTES - 1))
        data = line + b"\n"
        commands = self.command_ids()
        return [
            BenchEvent(
                command_id=commands[index % self.commands],
                sequence=index // self.commands + 1,
                id=uuid.UUID(int=chooser.getrandbits(128), version=4),
                data=data,
            )
            for index in range(self.events_total)
        ]


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` percentile (nearest rank) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class Result:
    """One scenario's figures; ``events_per_second`` is what the plot shows."""

    scenario: str
    system: str
    durability: str
    events: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    cpu_percent: float = 0.0
    peak_rss_mib: float = 0.0
    processes: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    group: str = "ingest"

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 0.99)

    def as_dict(self) -> dict[str, Any]:
        """The figures as plain JSON values (latencies summarised)."""
        return {
            "scenario": self.scenario,
            "system": self.system,
            "durability": self.durability,
            "group": self.group,
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events_per_second, 1),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "latency_samples": len(self.latencies_ms),
            "cpu_percent": round(self.cpu_percent, 1),
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "processes": self.processes,
            "parameters": self.parameters,
            "notes": self.notes,
        }


PidSource = Callable[[], Iterable[int]]


def own_process() -> list[int]:
    """This process (the load generator)."""
    return [os.getpid()]


def fixed_pids(*pids: int) -> PidSource:
    """A pid source for processes known in advance."""
    return lambda: list(pids)


def postgres_backends(database: str) -> PidSource:
    """The Postgres processes serving connections to ``database``.

    A backend's process title names its database
    (``postgres: ... user database host(port) state``).
    """

    def find() -> Iterator[int]:
        for process in psutil.process_iter(["name", "cmdline"]):
            try:
                cmdline = process.info["cmdline"] or []
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            title = " ".join(cmdline)
            if title.startswith("postgres:") and f" {database} " in f"{title} ":
                yield process.pid

    return lambda: list(find())


def processes_named(name: str) -> PidSource:
    """Every process whose executable name is ``name`` (nats-server, beam.smp)."""

    def find() -> Iterator[int]:
        for process in psutil.process_iter(["name"]):
            if process.info["name"] == name:
                yield process.pid

    return lambda: list(find())


@dataclass
class _Tracked:
    process: psutil.Process
    first_cpu: float
    last_cpu: float


class ResourceMonitor:
    """CPU seconds and peak private memory of groups of processes, on a thread.

    Use as a context manager around the measured part. Processes that appear
    during the run (new backends) count from zero; processes that end keep
    their last sampled CPU time.
    """

    def __init__(self, groups: dict[str, PidSource]) -> None:
        self._groups = groups
        self._tracked: dict[str, dict[int, _Tracked]] = {name: {} for name in groups}
        self._peak_rss: dict[str, int] = dict.fromkeys(groups, 0)
        self._peak_total_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started_wall = 0.0
        self._seconds = 0.0
        self._refresh_every = 5

    def __enter__(self) -> ResourceMonitor:
        self._started_wall = time.time()
        self._sample(refresh=True, baseline=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample(refresh=True, baseline=False)
        self._seconds = time.time() - self._started_wall

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(SAMPLE_INTERVAL_SECONDS):
            ticks += 1
            self._sample(refresh=ticks % self._refresh_every == 0, baseline=False)

    def _sample(self, *, refresh: bool, baseline: bool) -> None:
        total_rss = 0
        for name, source in self._groups.items():
            tracked = self._tracked[name]
            if refresh:
                for pid in source():
                    if pid in tracked:
                        continue
                    try:
                        process = psutil.Process(pid)
                        cpu = _cpu_seconds(process)
                        # A process born during the run owes all its CPU to it.
                        young = process.create_time() >= self._started_wall
                        first = 0.0 if young and not baseline else cpu
                        tracked[pid] = _Tracked(process, first, cpu)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
            group_rss = 0
            for entry in tracked.values():
                try:
                    with entry.process.oneshot():
                        entry.last_cpu = _cpu_seconds(entry.process)
                        group_rss += _private_bytes(entry.process)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self._peak_rss[name] = max(self._peak_rss[name], group_rss)
            total_rss += group_rss
        self._peak_total_rss = max(self._peak_total_rss, total_rss)

    def cpu_seconds(self, group: str) -> float:
        return sum(e.last_cpu - e.first_cpu for e in self._tracked[group].values())

    def fill(self, result: Result) -> None:
        """Write CPU (100% is one core) and peak memory into ``result``."""
        seconds = max(self._seconds, 1e-9)
        total_cpu = 0.0
        for name in self._groups:
            cpu = self.cpu_seconds(name)
            total_cpu += cpu
            result.processes[name] = {
                "processes": len(self._tracked[name]),
                "cpu_percent": round(100 * cpu / seconds, 1),
                "peak_rss_mib": round(self._peak_rss[name] / 2**20, 1),
            }
        result.cpu_percent = 100 * total_cpu / seconds
        result.peak_rss_mib = self._peak_total_rss / 2**20


def _private_bytes(process: psutil.Process) -> int:
    # Resident pages minus shared ones (file-backed and shared memory), so
    # the many Postgres backends do not each count the shared buffers.
    memory = process.memory_info()
    return int(memory.rss - getattr(memory, "shared", 0))


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)
