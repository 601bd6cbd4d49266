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
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from core import wire
from core.errors import ConfigurationError, RunledgerError
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
# Pause before resending after a frame is refused (over a rate, say).
ERROR_RESEND_INITIAL = 0.25
ERROR_RESEND_MAX = 5.0
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

    def link_connected(self, limits: wire.Limits) -> None: ...

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


class _OutgoingEvent(msgspec.Struct, omit_defaults=True):
    """A :class:`core.wire.WireEvent` as JSON, from the spool's stored text.

    Same field names as WireEvent; ids go out as the text the spool keeps
    and the payload as its stored JSON, so nothing is parsed to be sent.
    """

    command_id: str
    kind: str
    id: str
    sequence: int
    stream: str | None = None
    data: bytes = b""
    payload: msgspec.Raw | None = None
    emitted_at: float | None = None


def encode_event(event: SpooledEvent) -> bytes:
    """The JSON of one event as it travels."""
    return _encoder.encode(
        _OutgoingEvent(
            command_id=event.command_key,
            kind=event.kind,
            id=event.id_key,
            sequence=event.sequence,
            stream=event.stream,
            data=event.data,
            payload=None
            if event.payload_json is None
            else msgspec.Raw(event.payload_json.encode()),
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


class SessionEnded(RunledgerError):
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
        self._error_backoff = Backoff(ERROR_RESEND_INITIAL, ERROR_RESEND_MAX)

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
            except ssl.SSLCertVerificationError as error:
                log.error(
                    "runner.certificate_refused",
                    broker_url=self.settings.broker_url,
                    error=error.verify_message,
                    hint="set RUNLEDGER_CA_BUNDLE to the CA that signed the broker",
                )
            except (OSError, WebSocketException, SessionEnded, TimeoutError) as error:
                event = (
                    "runner.disconnected" if self.connected else "runner.connect_failed"
                )
                log.warning(
                    event,
                    broker_url=self.settings.broker_url,
                    error=str(error) or type(error).__name__,
                )
            except Exception:
                # Anything else (the spool's disk failing, say) must not end
                # the link for good: report it and try again after the backoff.
                log.exception("runner.link_failed", broker_url=self.settings.broker_url)
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
            self.connected = True
            self._backoff.reset()
            if hello is None:
                self.limits = DEFAULT_LIMITS
                log.warning(
                    "runner.connected_without_hello",
                    broker_url=self.settings.broker_url,
                    spooled=self.spool.spooled_count,
                    hint="an older broker; sending with the default limits",
                )
            else:
                self.limits = hello.limits
                log.info(
                    "runner.connected",
                    broker_url=self.settings.broker_url,
                    runner_name=hello.runner_name,
                    connection_epoch=hello.connection_epoch,
                    spooled=self.spool.spooled_count,
                )
            self.handler.link_connected(self.limits)

            # Three loops share the connection; the first to end ends them all.
            await _until_one_ends(
                self._send_loop(connection),
                self._receive_loop(connection),
                self._resend_loop(connection),
            )

    async def _receive_hello(self, connection: ClientConnection) -> wire.Hello | None:
        """The broker's hello, or None from an older broker that sends none."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
        # a cancel that coincides with the hello arriving.
        try:
            async with asyncio.timeout(self.settings.hello_timeout):
                raw = await connection.recv()
        except TimeoutError:
            return None
        try:
            message = wire.broker_message_decoder.decode(raw)
        except msgspec.DecodeError as error:
            raise SessionEnded(
                f"the broker's first message is malformed: {error}"
            ) from error
        if isinstance(message, wire.Hello):
            return message

        # No hello: whatever came first is an ordinary message.
        self._dispatch(message)
        return None

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

            await self._send_batch(connection, batch)
            sent_through = batch[-1].row

    def _frame_data_bytes(self) -> int:
        return (self.limits.max_frame_bytes * 3) // 4

    async def _send_batch(
        self, connection: ClientConnection, events: list[SpooledEvent]
    ) -> None:
        """Send ``events`` in as many frames as the broker's limits need."""
        frame: list[bytes] = []
        frame_bytes = len(_FRAME_START) + len(_FRAME_END)
        frame_events: list[SpooledEvent] = []
        for event in events:
            encoded = encode_event(event)
            too_big = frame_bytes + len(encoded) + 1 > self.limits.max_frame_bytes
            too_many = len(frame) >= self.limits.max_batch_events
            if frame and (too_big or too_many):
                await self._send_frame(connection, frame, frame_events)
                frame, frame_events = [], []
                frame_bytes = len(_FRAME_START) + len(_FRAME_END)
            frame.append(encoded)
            frame_events.append(event)
            frame_bytes += len(encoded) + 1
        if frame:
            await self._send_frame(connection, frame, frame_events)

    async def _send_frame(
        self,
        connection: ClientConnection,
        frame: list[bytes],
        events: list[SpooledEvent],
    ) -> None:
        # Recorded before sending: an acknowledgement can come back at once.
        # An event sent again counts one more attempt and waits longer.
        now = time.monotonic()
        resend_at: dict[int, float] = {}
        for event in events:
            previous = self.in_flight.get(event.row)
            attempts = 1 if previous is None else previous.attempts + 1
            if previous is None:
                self.in_flight_bytes += len(event.data)
            if attempts not in resend_at:
                resend_at[attempts] = now + resend_delay(
                    attempts,
                    self.settings.acknowledge_timeout,
                    self.settings.acknowledge_timeout_max,
                )
            self.in_flight[event.row] = InFlight(
                event.row, len(event.data), attempts, resend_at[attempts]
            )
        await connection.send(frame_of(frame), text=True)
        log.debug("runner.batch_sent", events=len(events))

    async def _resend_loop(self, connection: ClientConnection) -> None:
        while True:
            await asyncio.sleep(RESEND_CHECK_SECONDS)
            now = time.monotonic()
            late = [e for e in self.in_flight.values() if e.resend_at <= now]
            if not late:
                continue

            # Re-read from the spool: events acknowledged meanwhile are gone.
            still_spooled = self.spool.read_rows(entry.row for entry in late)
            spooled_rows = {event.row for event in still_spooled}
            for entry in late:
                if entry.row not in spooled_rows:
                    self._settle(entry.row)
            if not still_spooled:
                continue
            log.warning(
                "runner.acknowledge_timeout",
                events=len(still_spooled),
                attempt=max(entry.attempts for entry in late) + 1,
                command_id=still_spooled[0].command_key,
                sequence=still_spooled[0].sequence,
            )
            self.resent_total += len(still_spooled)
            await self._send_batch(connection, still_spooled)

    def _resend_soon(self) -> None:
        """Bring forward the resend of everything in flight.

        A refused frame is not named in the error, so every unacknowledged
        event becomes due shortly; those the broker did store are merely
        acknowledged again.
        """
        due = time.monotonic() + self._error_backoff.next_delay()
        for entry in self.in_flight.values():
            entry.resend_at = min(entry.resend_at, due)

    # Receiving

    async def _receive_loop(self, connection: ClientConnection) -> None:
        async for raw in connection:
            try:
                message = wire.broker_message_decoder.decode(raw)
            except msgspec.DecodeError as error:
                log.warning("runner.message_malformed", error=str(error))
                continue
            self._dispatch(message)

    def _dispatch(self, message: wire.BrokerMessage) -> None:
        if isinstance(message, wire.EventAck):
            self._take_acknowledgement(message)
        elif isinstance(message, wire.CommandMessage):
            self.handler.command_received(message)
        elif isinstance(message, wire.CancelMessage):
            self.handler.cancel_received(message)
        elif isinstance(message, wire.ErrorMessage):
            # A whole frame was refused (over a rate, storage failed, ...):
            # its events are resent after a short, growing pause.
            log.warning(
                "runner.frame_refused", code=message.code, reason=message.reason
            )
            self._resend_soon()
        elif isinstance(message, wire.Hello):
            self.limits = message.limits
            self.handler.link_connected(message.limits)

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

        if message.acknowledged:
            self._error_backoff.reset()
        self.wake.notify()
        self.handler.events_settled()

    def _settle(self, row: int) -> None:
        entry = self.in_flight.pop(row, None)
        if entry is not None:
            self.in_flight_bytes -= entry.size


async def _until_one_ends(*loops: Coroutine[Any, Any, None]) -> None:
    """Run ``loops`` until one ends; cancel the rest; raise why it ended."""
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        error = task.exception()
        if error is not None:
            raise error
    raise SessionEnded("the broker closed the connection")
