"""A minimal HTTP sink on loopback that answers every POST with 200.

It stands for the predecessor's web tier in the old-design baseline: it
reads each request in full (keep-alive, ``Content-Length`` bodies) and
counts what it received. Run it alone with ``python -m bench.compare.sink``;
it prints ``port N`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from core.loop import run_event_loop

OK_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"
)


class CountingSink:
    """Answers 200 to every request and counts them."""

    def __init__(self) -> None:
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                if length:
                    await reader.readexactly(length)
                self.requests += 1
                writer.write(OK_RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _main(port: int) -> None:
    sink = CountingSink()
    await sink.start(port=port)
    print(f"port {sink.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    with contextlib.suppress(KeyboardInterrupt):
        run_event_loop(_main(parser.parse_args().port))
