"""Run one runledger service in a process of its own, for the benchmarks.

``python -m bench.compare.serve broker|relay|web --database-url URL
--settings JSON`` builds the service from its settings class (the JSON
object overrides fields; the port defaults to 0), starts it, prints
``port N`` (0 for the relay, which does not listen) and runs until SIGTERM,
then stops it within its own bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from core.logging import configure_logging
from core.loop import run_event_loop
from core.service import Service


def build_service(kind: str, database_url: str, overrides: dict[str, Any]) -> Service:
    """The service called ``kind``, built from its settings and ``overrides``."""
    if kind == "broker":
        from broker.server import BrokerServer
        from broker.settings import BrokerSettings

        settings = {"host": "127.0.0.1", "port": 0, **overrides}
        return BrokerServer(BrokerSettings(**settings), database_url)
    if kind == "relay":
        from broker.relay import Relay, RelaySettings

        return Relay(RelaySettings(**overrides), database_url)
    if kind == "web":
        from web.server import WebServer
        from web.settings import WebSettings

        settings = {"host": "127.0.0.1", "port": 0, **overrides}
        return WebServer(WebSettings(**settings), database_url)
    raise ValueError(f"unknown service {kind!r}; use broker, relay or web")


async def _serve(kind: str, database_url: str, overrides: dict[str, Any]) -> None:
    service = build_service(kind, database_url, overrides)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stopping.set)

    await service.start()
    print(f"port {getattr(service, 'port', 0) or 0}", flush=True)
    await stopping.wait()
    await service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=("broker", "relay", "web"))
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--settings", default="{}", help="JSON object of overrides")
    arguments = parser.parse_args()
    configure_logging("WARNING", json=True)
    # The same loop as the `runledger` commands: uvloop where installed.
    run_event_loop(
        _serve(arguments.kind, arguments.database_url, json.loads(arguments.settings))
    )


if __name__ == "__main__":
    main()
