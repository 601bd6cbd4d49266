"""The web tier as a service: uvicorn serving the app in the current event loop.

``WebServer(settings, database_url)``: ``await start()`` returns once the
socket listens (``.port`` is then the bound port, port 0 works);
``await stop()`` releases long polls, then stops within the graceful
shutdown time. uvicorn's own signal handling is off: whoever composes the
services owns the signals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn

from core.errors import RunledgerError
from core.logging import get_logger
from web.app import create_app
from web.runtime import runtime_from_state
from web.settings import WebSettings

log = get_logger("web")


class WebStartError(RunledgerError):
    """The web tier could not start (port taken, database unreachable, ...)."""


class _LoopServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: the caller owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebServer:
    """The web tier as a service: ``await start()``, ``.port``, ``await stop()``."""

    def __init__(self, settings: WebSettings, database_url: str) -> None:
        self.settings = settings
        self.database_url = database_url
        self.app = create_app(settings, database_url)
        self._server: _LoopServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port; only valid after ``start()``."""
        if self._server is None or not self._server.servers:
            raise RuntimeError("the web server is not started")
        port: int = self._server.servers[0].sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """The base URL people and the relay use."""
        return f"http://{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Serve; return once listening. Raises WebStartError when it cannot."""
        config = uvicorn.Config(
            self.app,
            host=self.settings.host,
            port=self.settings.port,
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(
                int(self.settings.graceful_shutdown_seconds), 1
            ),
        )
        self._server = _LoopServer(config)
        self._task = asyncio.create_task(self._serve(), name="runledger-web")

        # Wait for either "listening" or the serve task ending early.
        while not self._server.started:
            if self._task.done():
                error = self._task.exception()
                runtime = runtime_from_state(self.app.state)
                cause = runtime.startup_error or error
                raise WebStartError(
                    f"the web tier could not start on "
                    f"{self.settings.host}:{self.settings.port}: {cause or 'see log'}"
                ) from cause
            await asyncio.sleep(0.02)
        log.info("web.listening", url=self.url)

    async def _serve(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve()
        except SystemExit as error:
            # uvicorn exits the process on bind or lifespan failure; here that
            # must become an error of this service, not of the whole loop.
            raise WebStartError(f"uvicorn stopped with status {error.code}") from None

    async def stop(self) -> None:
        """Stop serving within the graceful shutdown time (plus a little)."""
        if self._server is None or self._task is None:
            return
        # Long polls would hold the graceful shutdown open; release them first.
        runtime_from_state(self.app.state).notifier.wake_all()
        await runtime_from_state(self.app.state).notifier.close()
        self._server.should_exit = True
        try:
            await asyncio.wait_for(
                asyncio.shield(self._task), self.settings.graceful_shutdown_seconds + 5
            )
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebStartError):
                await self._task
        except WebStartError:
            pass
        log.info("web.stopped")
