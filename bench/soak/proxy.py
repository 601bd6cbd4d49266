"""Fault-injecting proxies the soak owns: TCP for runners, HTTP for the sink.

:class:`TcpProxy` forwards runner connections to the broker and can drop
every open connection at once or stall all traffic for a while.
:class:`SinkProxy` stands between the relay and the web tier's ingest
endpoint and, while a fault is on, answers 503, answers 429 with
``Retry-After``, or holds the request past the relay's timeout and closes.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx

READ_BYTES = 65536


class TcpProxy:
    """Loopback TCP proxy from ``.port`` to ``target_port``, with faults."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.drop_all()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def drop_all(self) -> int:
        """Abort every open connection (both sides); return how many."""
        pairs = list(self._pairs)
        for client, upstream in pairs:
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()
        return len(pairs)

    async def stall(self, seconds: float) -> None:
        """Stop moving bytes either way for ``seconds``, connections left open."""
        self._flowing.clear()
        try:
            await asyncio.sleep(seconds)
        finally:
            self._flowing.set()

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            client_writer.transport.abort()
            return
        pair = (client_writer, upstream_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pump(client_reader, upstream_writer),
                self._pump(upstream_reader, client_writer),
            )
        finally:
            self._pairs.discard(pair)
            client_writer.transport.abort()
            upstream_writer.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                data = await reader.read(READ_BYTES)
                if not data:
                    break
                # A stall holds bytes already read until the flow resumes.
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()


SINK_MODES = ("pass", "fail", "timeout", "429")


class SinkProxy:
    """HTTP/1.1 proxy to the web tier whose answers a fault can replace."""

    def __init__(self, target_port: int, hold_seconds: float) -> None:
        self.target_port = target_port
        self.hold_seconds = hold_seconds
        self.port = 0
        self.mode = "pass"
        self.answered: dict[str, int] = dict.fromkeys(SINK_MODES, 0)
        self._server: asyncio.Server | None = None
        self._client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{target_port}", timeout=60
        )

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        await self._client.aclose()

    async def fault(self, mode: str, seconds: float) -> None:
        """Answer every request in ``mode`` for ``seconds``, then pass again."""
        self.mode = mode
        try:
            await asyncio.sleep(seconds)
        finally:
            self.mode = "pass"

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                if not await self._answer(writer, *request):
                    break
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.transport.abort()

    async def _answer(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
    ) -> bool:
        mode = self.mode
        self.answered[mode] += 1
        if mode == "fail":
            writer.write(_response(503, b"sink failing on purpose"))
        elif mode == "429":
            writer.write(_response(429, b"slow down", {"retry-after": "1"}))
        elif mode == "timeout":
            # Longer than the relay waits; then close without an answer.
            await asyncio.sleep(self.hold_seconds)
            return False
        else:
            forwarded = {
                name: value
                for name, value in headers.items()
                if name not in ("host", "content-length", "connection")
            }
            try:
                response = await self._client.request(
                    method, path, headers=forwarded, content=body
                )
            except httpx.HTTPError:
                writer.write(_response(502, b"web tier unreachable"))
            else:
                extra = {}
                if "retry-after" in response.headers:
                    extra["retry-after"] = response.headers["retry-after"]
                writer.write(_response(response.status_code, response.content, extra))
        await writer.drain()
        return True


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return method, path, headers, body


def _response(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
