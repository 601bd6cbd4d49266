"""The runner's link to its broker: one WebSocket, kept alive and refilled.

:class:`BrokerLink` connects with the runner's token in an ``Authorization:
Bearer`` header, waits for the broker's ``hello`` (which carries the limits
to chunk and batch below), then sends the spool's events oldest first in
batches, keeping at most ``window_events`` events and ``window_bytes`` bytes
unacknowledged. An event not acknowledged within the acknowledgement timeout
is sent again, with exponential backoff and jitter, until it is acknowledged
or refused: it is never dropped. When the connection drops or its keepalive
pings go unanswered, the link reconnects with exponential backoff and jitter
and starts again from the oldest spooled event.

Only the spool knows what must be sent; the link keeps in memory just the
rows in flight, so its memory does not grow with the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from dataclasses import dataclass
from typing import Protocol

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from core import wire
from core.errors import ConfigurationError
from core.logging import get_logger
from runner.backoff import Backoff
from runner.settings import RunnerSettings
from runner.spool import Spool, SpooledEvent

log = get_logger("runner")

# Limits assumed until a broker's hello says otherwise.
DEFAULT_LIMITS = wire.Limits(
    max_frame_bytes=1024 * 1024, max_batch_events=500, max_event_bytes=512 * 1024
)
# The most a broker message may be; commands are small, this is generous.
MAX_INCOMING_BYTES = 16 * 1024 * 1024
# How often the resend check looks for events whose acknowledgement is late.
RESEND_CHECK_SECONDS = 0.25
# A session that lasted this long counts as a success for the reconnect backoff.
STABLE_SESSION_SECONDS = 10.0

_FRAME_START = b'{"type":"events","events":['
_FRAME_END = b"]}"
_encoder = msgspec.json.Encoder()


class Signal:
    """Wakes every task waiting for "something changed".

    Take :meth:`armed` before looking at the state, then await it: a change
    made in between still wakes the waiter.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake everyone armed so far."""
        self._event.set()
        self._event = asyncio.Event()

    def armed(self) -> asyncio.Event:
        """An event that the next :meth:`notify` sets."""
        return self._event


class LinkHandler(Protocol):
    """What the link asks of the daemon."""

    def broker_said_hello(self, hello: wire.Hello) -> None: ...

    def command_received(self, message: wire.CommandMessage) -> None: ...

    def cancel_received(self, message: wire.CancelMessage) -> None: ...

    def events_settled(self) -> None: ...


@dataclass
class InFlight:
    """An event sent on the current connection and not yet acknowledged."""

    row: int
    size: int
    attempts: int
    resend_at: float


def encode_event(event: SpooledEvent) -> bytes:
    """The JSON of one event as it travels."""
    return _encoder.encode(
        wire.WireEvent(
            command_id=event.command_id,
            kind=event.kind,
            id=event.id,
            sequence=event.sequence,
            stream=event.stream,
            data=event.data,
            payload=event.payload,
            emitted_at=event.emitted_at,
        )
    )


def frame_of(encoded_events: list[bytes]) -> bytes:
    """An ``events`` message made of already-encoded events."""
    return _FRAME_START + b",".join(encoded_events) + _FRAME_END


def resend_delay(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait for an acknowledgement after send number ``attempts``.

    The first wait is the acknowledgement timeout itself; each resend doubles
    it, up to ``maximum``, plus up to a fifth more as jitter.
    """
    nominal = min(maximum, initial * 2 ** min(attempts - 1, 32))
    return nominal * (1 + random.random() / 5)


def ssl_context_for(settings: RunnerSettings) -> ssl.SSLContext | None:
    """The TLS context that verifies a wss:// broker, or None for ws://."""
    if not settings.broker_url.startswith("wss://"):
        return None
    context = ssl.create_default_context()
    if settings.ca_bundle is not None:
        try:
            context.load_verify_locations(cafile=str(settings.ca_bundle))
        except (OSError, ssl.SSLError) as error:
            raise ConfigurationError(
                f"RUNLEDGER_CA_BUNDLE={settings.ca_bundle} is not a readable PEM "
                f"file of certificates: {error}"
            ) from error
    return context


class SessionEnded(Exception):
    """The current connection is over; the link reconnects."""


class BrokerLink:
    """Keeps one connection to the broker and drains the spool through it."""

    def __init__(
        self,
        settings: RunnerSettings,
        spool: Spool,
        handler: LinkHandler,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.handler = handler
        # Notified when the spool grows or the window opens.
        self.wake = Signal()
        self.connected = False
        self.limits = DEFAULT_LIMITS
        self.in_flight: dict[int, InFlight] = {}
        self.in_flight_bytes = 0
        self.resent_total = 0
        self._connection: ClientConnection | None = None
        self._ssl = ssl_context_for(settings)
        self._backoff = Backoff(settings.reconnect_initial, settings.reconnect_max)

    @property
    def unacknowledged(self) -> int:
        """Events sent on this connection and not yet acknowledged."""
        return len(self.in_flight)

    async def run(self) -> None:
        """Connect, send, and reconnect for ever (until cancelled)."""
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except InvalidStatus as error:
                status = error.response.status_code
                if status in (401, 403):
                    log.error(
                        "runner.authentication_refused",
                        broker_url=self.settings.broker_url,
                        status=status,
                        hint="check the runner token (runledger runner add NAME)",
                    )
                else:
                    log.warning("runner.connect_failed", status=status)
            except (OSError, WebSocketException, SessionEnded, TimeoutError) as error:
                event = (
                    "runner.disconnected" if self.connected else "runner.connect_failed"
                )
                log.warning(
                    event,
                    broker_url=self.settings.broker_url,
                    error=str(error) or type(error).__name__,
                )
            finally:
                self._forget_connection()

            if time.monotonic() - started > STABLE_SESSION_SECONDS:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            log.debug("runner.reconnect_wait", seconds=round(delay, 2))
            await asyncio.sleep(delay)

    async def send_notice(self, message: wire.CommandStarted) -> None:
        """Send a small message now if connected; it is not spooled."""
        connection = self._connection
        if connection is None or not self.connected:
            return
        with contextlib.suppress(ConnectionClosed):
            await connection.send(wire.encode(message), text=True)

    async def close(self) -> None:
        """Close the current connection, if any, politely."""
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await connection.close()

    # One connection's life

    async def _session(self) -> None:
        headers = {"Authorization": f"Bearer {self.settings.token or ''}"}
        async with connect(
            self.settings.broker_url,
            additional_headers=headers,
            ssl=self._ssl,
            proxy=None,
            compression="deflate" if self.settings.compression else None,
            open_timeout=self.settings.open_timeout,
            ping_interval=self.settings.ping_interval,
            ping_timeout=self.settings.ping_timeout,
            close_timeout=2,
            max_size=MAX_INCOMING_BYTES,
        ) as connection:
            self._connection = connection
            hello = await self._receive_hello(connection)
            self.limits = hello.limits
            self.connected = True
            self._backoff.reset()
            log.info(
                "runner.connected",
                broker_url=self.settings.broker_url,
                runner_name=hello.runner_name,
                connection_epoch=hello.connection_epoch,
                spooled=self.spool.spooled_count,
            )
            self.handler.broker_said_hello(hello)

            # Three loops share the connection; the first to fail ends them all.
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._send_loop(connection))
                tasks.create_task(self._receive_loop(connection))
                tasks.create_task(self._resend_loop(connection))

    async def _receive_hello(self, connection: ClientConnection) -> wire.Hello:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
        # a cancel that coincides with the hello arriving.
        async with asyncio.timeout(self.settings.open_timeout):
            raw = await connection.recv()
        try:
            message = wire.broker_message_decoder.decode(raw)
        except msgspec.DecodeError as error:
            raise SessionEnded(
                f"the broker's first message is malformed: {error}"
            ) from error
        if not isinstance(message, wire.Hello):
            raise SessionEnded(
                f"the broker's first message is {type(message).__name__}, not hello"
            )
        return message

    def _forget_connection(self) -> None:
        # Whatever was in flight is resent from the spool on the next connection.
        self.connected = False
        self._connection = None
        self.in_flight.clear()
        self.in_flight_bytes = 0
        self.handler.events_settled()

    # Sending

    async def _send_loop(self, connection: ClientConnection) -> None:
        sent_through = 0
        while True:
            # Armed before looking, so a wake-up in between is not missed.
            woken = self.wake.armed()
            room_events = min(
                self.settings.window_events - len(self.in_flight),
                self.limits.max_batch_events,
            )
            room_bytes = self.settings.window_bytes - self.in_flight_bytes
            batch: list[SpooledEvent] = []
            if room_events > 0 and room_bytes > 0:
                batch = self.spool.read_after(
                    sent_through,
                    room_events,
                    max_bytes=min(room_bytes, self._frame_data_bytes()),
                )
            if not batch:
                await woken.wait()
                continue

            sent = await self._send_batch(connection, batch, attempts=1)
            sent_through = sent[-1].row

    def _frame_data_bytes(self) -> int:
        return (self.limits.max_frame_bytes * 3) // 4

    async def _send_batch(
        self, connection: ClientConnection, events: list[SpooledEvent], attempts: int
    ) -> list[SpooledEvent]:
        """Send ``events`` in as many frames as the limits need; return them."""
        frame: list[bytes] = []
        frame_bytes = len(_FRAME_START) + len(_FRAME_END)
        frame_events: list[SpooledEvent] = []
        for event in events:
            encoded = encode_event(event)
            too_big = frame_bytes + len(encoded) + 1 > self.limits.max_frame_bytes
            too_many = len(frame) >= self.limits.max_batch_events
            if frame and (too_big or too_many):
                await self._send_frame(connection, frame, frame_events, attempts)
                frame, frame_events = [], []
                frame_bytes = len(_FRAME_START) + len(_FRAME_END)
            frame.append(encoded)
            frame_events.append(event)
            frame_bytes += len(encoded) + 1
        if frame:
            await self._send_frame(connection, frame, frame_events, attempts)
        return events

    async def _send_frame(
        self,
        connection: ClientConnection,
        frame: list[bytes],
        events: list[SpooledEvent],
        attempts: int,
    ) -> None:
        # Recorded before sending: an acknowledgement can come back at once.
        resend_at = time.monotonic() + resend_delay(
            attempts,
            self.settings.acknowledge_timeout,
            self.settings.acknowledge_timeout_max,
        )
        for event in events:
            if event.row not in self.in_flight:
                self.in_flight_bytes += len(event.data)
            self.in_flight[event.row] = InFlight(
                event.row, len(event.data), attempts, resend_at
            )
        await connection.send(frame_of(frame), text=True)
        log.debug("runner.batch_sent", events=len(events), attempts=attempts)

    async def _resend_loop(self, connection: ClientConnection) -> None:
        while True:
            await asyncio.sleep(RESEND_CHECK_SECONDS)
            now = time.monotonic()
            late = [e for e in self.in_flight.values() if e.resend_at <= now]
            if not late:
                continue

            # Re-read from the spool: events acknowledged meanwhile are gone.
            rows = [entry.row for entry in late]
            still_spooled = {e.row: e for e in self.spool.read_rows(rows)}
            for entry in late:
                if entry.row not in still_spooled:
                    self._settle(entry.row)
            attempts = max(entry.attempts for entry in late) + 1
            log.warning(
                "runner.acknowledge_timeout",
                events=len(still_spooled),
                attempt=attempts,
                oldest_row=min(still_spooled, default=None),
            )
            self.resent_total += len(still_spooled)
            for entry in late:
                event = still_spooled.get(entry.row)
                if event is not None:
                    await self._send_batch(connection, [event], entry.attempts + 1)

    # Receiving

    async def _receive_loop(self, connection: ClientConnection) -> None:
        async for raw in connection:
            try:
                message = wire.broker_message_decoder.decode(raw)
            except msgspec.DecodeError as error:
                log.warning("runner.message_malformed", error=str(error))
                continue

            if isinstance(message, wire.EventAck):
                self._take_acknowledgement(message)
            elif isinstance(message, wire.CommandMessage):
                self.handler.command_received(message)
            elif isinstance(message, wire.CancelMessage):
                self.handler.cancel_received(message)
            elif isinstance(message, wire.ErrorMessage):
                # The whole frame was refused; its events are resent when their
                # acknowledgement times out.
                log.warning(
                    "runner.frame_refused", code=message.code, reason=message.reason
                )
            elif isinstance(message, wire.Hello):
                self.limits = message.limits
                self.handler.broker_said_hello(message)

    def _take_acknowledgement(self, message: wire.EventAck) -> None:
        rows = self.spool.acknowledge(
            (item.id, item.command_id, item.sequence) for item in message.acknowledged
        )
        for row in rows:
            self._settle(row)

        for refusal in message.refused:
            refused_row = self.spool.refuse(
                refusal.id,
                refusal.command_id,
                refusal.sequence,
                refusal.code,
                refusal.reason,
            )
            log.warning(
                "runner.event_refused",
                command_id=str(refusal.command_id) if refusal.command_id else None,
                sequence=refusal.sequence,
                event_id=str(refusal.id) if refusal.id else None,
                code=refusal.code,
                reason=refusal.reason,
                moved_aside=refused_row is not None,
            )
            if refused_row is not None:
                self._settle(refused_row)

        self.wake.notify()
        self.handler.events_settled()

    def _settle(self, row: int) -> None:
        entry = self.in_flight.pop(row, None)
        if entry is not None:
            self.in_flight_bytes -= entry.size
