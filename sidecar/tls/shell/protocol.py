"""The protocol asyncio attaches to the TCP transport: engine in, application out.

See the package docstring for the theory of operation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..alerts import AlertDescription, TLSError
from ..client import ClientConnection
from ..config import TLSConfig
from ..connection import Connection
from ..events import (
    AlertReceived,
    ApplicationData,
    ConnectionClosed,
    Event,
    HandshakeComplete,
    PeerCertificate,
    SessionTicket,
)
from ..groups import NamedGroup
from ..server import ServerConnection
from ..suites import CipherSuite
from .transport import TLSTransport, enum_name, negotiated_info

logger = logging.getLogger("sidecar.tls.shell")

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# After our fatal alert: half-close, then read and drop what the peer still sends for up
# to LINGER_SECONDS (counted once our alert has left the buffer) or LINGER_BYTES, as
# lingering-close HTTP servers do. Closing a socket with unread bytes makes the kernel
# answer with a reset and drop what is still queued to send: the alert itself.
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024
_TICKETS_KEPT = 4
Clock = Callable[[], float]


class PeerAlertError(ConnectionError):
    """The peer ended the connection with a fatal alert (the alert it *sent*; a `TLSError`
    is one we detected and sent)."""

    def __init__(self, alert: AlertDescription | int) -> None:
        name = alert.name if isinstance(alert, AlertDescription) else str(alert)
        super().__init__(f"peer sent fatal alert {name}")
        self.alert = alert


class TLSShellProtocol(asyncio.Protocol):
    """The TCP-side protocol; use `TLSClientProtocol` or `TLSServerProtocol`."""

    def __init__(
        self,
        app_protocol: asyncio.BaseProtocol,
        config: TLSConfig,
        *,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        clock: Clock = time.time,
    ) -> None:
        self.app_protocol = app_protocol
        self._config = config
        self._timeout = handshake_timeout
        self._clock = clock
        self._tls: Connection | None = None
        self._raw: asyncio.Transport | None = None
        self._transport = TLSTransport(self)
        self._loop = asyncio.get_running_loop()
        self._handshake: asyncio.Future[TLSTransport] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._pending: deque[Event] = deque()
        self._early: list[bytes] = []
        self._delivering = False
        self.app_reading_paused = False
        self._app_connected = False
        self._app_lost = False
        self._writing_paused = False
        self._closing = False
        self._error: BaseException | None = None
        self._peer: PeerCertificate | None = None
        # For get_extra_info("tls_session_tickets"); resumption itself takes them from
        # `config.ticket_store`. A server may send any number: only the last few are held.
        self._tickets: deque[SessionTicket] = deque(maxlen=_TICKETS_KEPT)
        self._clean_close: bool | None = None
        self._peer_alert: AlertDescription | int | None = None
        self._lingering = False
        self._lingered_bytes = 0
        self._linger_deadline = 0.0
        self._linger_timer: asyncio.TimerHandle | None = None

    def _new_engine(self) -> Connection:
        raise NotImplementedError

    # --- for TLSTransport --------------------------------------------------------------

    @property
    def tls(self) -> Connection:
        if self._tls is None:
            raise RuntimeError("not connected")
        return self._tls

    @property
    def raw(self) -> asyncio.Transport:
        if self._raw is None:
            raise RuntimeError("not connected")
        return self._raw

    @property
    def closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    @property
    def transport(self) -> TLSTransport:
        return self._transport

    def handshake_done(self) -> Awaitable[TLSTransport]:
        """Resolves with the transport when the handshake completes; raises TLSError,
        PeerAlertError, TimeoutError or ConnectionError when it cannot."""
        return asyncio.shield(self._handshake)

    def extra_info(self, name: str, default: Any) -> Any:
        tls = self._tls
        info = tls.negotiated if tls is not None else None
        if tls is not None and info is not None:
            value = negotiated_info(name, info, tls, self._peer)
            if value is not None:
                return value
        if name == "tls_clean_close":
            return self._clean_close
        if name == "tls_session_tickets":
            return tuple(self._tickets)
        if name == "tls_connection":
            return tls
        if name in ("sslcontext", "ssl_object"):
            return default  # not the ssl module: these stay absent, as on a plain socket
        return self._raw.get_extra_info(name, default) if self._raw is not None else default

    def write(self, data: bytes) -> None:
        tls = self._tls
        if not data or tls is None or self._closing or tls.write_closed:
            return  # like asyncio's transports: writes after close are dropped
        tls.send_application_data(data)
        self._flush()

    def write_eof(self) -> None:
        if self._tls is not None and not self._tls.write_closed:
            self._tls.close()
            self._flush()

    def update_key(self, request_peer_update: bool) -> None:
        self.tls.update_key(request_peer_update)
        self._flush()

    def close(self) -> None:
        """close_notify, then close the socket once its buffer drained."""
        if self._closing:
            return
        self._closing = True
        self.write_eof()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def pause_reading(self) -> None:
        if not self.app_reading_paused:
            self.app_reading_paused = True
            if self._raw is not None and not self._raw.is_closing():
                self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self.app_reading_paused:
            self.app_reading_paused = False
            if self._raw is not None and not self._raw.is_closing():
                self._raw.resume_reading()
            self._loop.call_soon(self._deliver)

    # --- asyncio.Protocol (the TCP side) -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._raw = transport
        if self._timeout is not None:
            self._timer = self._loop.call_later(self._timeout, self._handshake_timed_out)
        self._tls = self._new_engine()
        self._flush()  # a client's ClientHello

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._lingered_bytes += len(data)
            if self._lingered_bytes > LINGER_BYTES:
                self._end_linger()
            return
        self._feed(data)

    def eof_received(self) -> bool | None:
        if self._lingering:
            self._cancel_linger()
            return False  # the peer has finished too: asyncio closes the socket
        self._feed(b"")
        # Keep the socket open only while our side still has something to say.
        return self._app_connected and not self._closing and not self.tls.write_closed

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._app_connected:
            self.app_protocol.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._app_connected:
            self.app_protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timer()
        self._cancel_linger()
        error = self._error or exc
        if not self._handshake.done():
            self._fail_handshake(
                error or ConnectionResetError("connection closed during the TLS handshake")
            )
        # Whatever was decrypted is handed over even if the application paused reading:
        # after this there is no later moment to deliver it.
        self.app_reading_paused = False
        self._deliver()
        if self._app_connected and not self._app_lost:
            self._app_lost = True
            self.app_protocol.connection_lost(error if isinstance(error, Exception) else None)

    # --- internals ---------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        tls = self._tls
        if tls is None:
            return
        try:
            tls.receive_data(data, now=self._clock())
        except TLSError as exc:
            self._error = exc
        self._pending.extend(tls.events())
        self._flush()
        self._deliver()
        if self._error is not None and self._raw is not None:
            # The fatal alert is queued before the half-close; asyncio flushes, then
            # shuts our side down.
            self._closing = True
            self._linger()
            if not self._handshake.done():
                self._fail_handshake(self._error)

    def _flush(self) -> None:
        if self._tls is None or self._raw is None:
            return
        out = self._tls.data_to_send()
        if out and not self._raw.is_closing() and not self._lingering:
            self._raw.write(out)

    def _deliver(self) -> None:
        """Hand queued events to the application, in order, unless it paused reading."""
        if self._delivering:
            return
        self._delivering = True
        try:
            while self._pending and not (self.app_reading_paused and self._app_connected):
                self._dispatch(self._pending.popleft())
        finally:
            self._delivering = False

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, ApplicationData):
            if self._app_connected and not self._app_lost:
                _feed_app(self.app_protocol, event.data)
            elif event.early:
                # 0-RTT data (RFC 8446 §2.3) precedes HandshakeComplete; the application
                # protocol exists only from then on, so it gets these bytes first. A
                # server enables 0-RTT only when its application accepts replayable data.
                self._early.append(event.data)
        elif isinstance(event, PeerCertificate):
            self._peer = event
        elif isinstance(event, HandshakeComplete):
            self._handshake_complete()
        elif isinstance(event, SessionTicket):
            self._tickets.append(event)
        elif isinstance(event, AlertReceived):
            if (
                event.description != AlertDescription.close_notify
                and event.description != AlertDescription.user_canceled
            ):
                self._peer_alert = event.description
        elif isinstance(event, ConnectionClosed):
            self._peer_closed(event.clean)

    def _handshake_complete(self) -> None:
        self._cancel_timer()
        tls = self.tls
        info = tls.negotiated
        assert info is not None
        logger.debug(
            "TLS handshake complete: %s %s peer=%s",
            enum_name(CipherSuite, info.cipher_suite),
            enum_name(NamedGroup, info.group),
            info.peer_spiffe_id,
        )
        self._app_connected = True
        self.app_protocol.connection_made(self._transport)
        early, self._early = self._early, []
        for data in early:
            _feed_app(self.app_protocol, data)
        if self._writing_paused:
            self.app_protocol.pause_writing()
        if not self._handshake.done():
            self._handshake.set_result(self._transport)

    def _peer_closed(self, clean: bool) -> None:
        if self._peer_alert is not None:
            self._error = self._error or PeerAlertError(self._peer_alert)
            if not self._handshake.done():
                self._fail_handshake(self._error)
            if self._raw is not None:
                self._closing = True
                self._raw.close()
            return
        if not self._app_connected:
            self._error = self._error or ConnectionResetError(
                "peer closed the connection during the TLS handshake"
            )
            return
        self._clean_close = clean
        if not clean:
            logger.debug("peer closed without close_notify (possible truncation)")
        keep_open = self.app_protocol.eof_received()  # type: ignore[attr-defined]
        if not keep_open:
            self.close()

    def _linger(self) -> None:
        """Half-close after our fatal alert and drain the peer (see LINGER_SECONDS)."""
        raw = self._raw
        if raw is None or raw.is_closing() or self._lingering:
            return
        if not raw.can_write_eof():
            raw.close()
            return
        self._lingering = True
        raw.write_eof()  # FIN once asyncio's buffer, our alert last, has drained
        if not raw.is_reading():
            raw.resume_reading()  # the application may have paused it
        self._linger_deadline = self._loop.time() + (self._timeout or DEFAULT_HANDSHAKE_TIMEOUT)
        self._linger_timer = self._loop.call_later(LINGER_SECONDS, self._linger_expired)

    def _linger_expired(self) -> None:
        self._linger_timer = None
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        if raw.get_write_buffer_size() and self._loop.time() < self._linger_deadline:
            # The peer is still reading what preceded our alert: its drain time starts
            # once the alert is out, within the handshake timeout (a peer that stopped
            # reading altogether must not hold the socket forever).
            self._linger_timer = self._loop.call_later(LINGER_SECONDS, self._linger_expired)
            return
        self._end_linger()

    def _end_linger(self) -> None:
        self._cancel_linger()
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        if raw.get_write_buffer_size():
            raw.abort()  # not read within the bound: nothing more can reach the peer
        else:
            raw.close()

    def _cancel_linger(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    def _fail_handshake(self, error: BaseException) -> None:
        self._cancel_timer()
        if not self._handshake.done():
            self._handshake.set_exception(error)
            # Someone may not await it (a server's per-connection shell): that is fine.
            self._handshake.exception()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._handshake.done():
            return
        self._error = TimeoutError(f"TLS handshake did not complete within {self._timeout:g}s")
        self._fail_handshake(self._error)
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _feed_app(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buf = memoryview(protocol.get_buffer(len(view)))
            n = min(len(buf), len(view))
            if not n:
                raise RuntimeError("get_buffer() returned an empty buffer")
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(data)  # type: ignore[attr-defined]


class TLSClientProtocol(TLSShellProtocol):
    """`loop.create_connection(lambda: TLSClientProtocol(app, config, server_name=...))`."""

    def __init__(
        self,
        app_protocol: asyncio.BaseProtocol,
        config: TLSConfig,
        *,
        server_name: str | None = None,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        clock: Clock = time.time,
        endpoint: str | None = None,
        expected_peer: str | None = None,
    ) -> None:
        """`endpoint` and `expected_peer` name the `config.ticket_store` slot whose ticket
        is offered and where new tickets go (see `ClientConnection`)."""
        super().__init__(app_protocol, config, handshake_timeout=handshake_timeout, clock=clock)
        self._server_name = server_name
        self._endpoint = endpoint
        self._expected_peer = expected_peer

    def _new_engine(self) -> Connection:
        return ClientConnection(
            self._config,
            server_name=self._server_name,
            now=self._clock(),
            endpoint=self._endpoint,
            expected_peer=self._expected_peer,
        )


class TLSServerProtocol(TLSShellProtocol):
    """`loop.create_server(lambda: TLSServerProtocol(app_factory(), config), ...)`.

    A failed handshake is logged (logger `sidecar.tls.shell`) and passed to `on_error`.
    """

    def __init__(
        self,
        app_protocol: asyncio.BaseProtocol,
        config: TLSConfig,
        *,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        clock: Clock = time.time,
        on_error: Callable[[BaseException, Any], None] | None = None,
    ) -> None:
        super().__init__(app_protocol, config, handshake_timeout=handshake_timeout, clock=clock)
        self._on_error = on_error
        self._handshake.add_done_callback(self._report)

    def _new_engine(self) -> Connection:
        return ServerConnection(self._config, now=self._clock())

    def _report(self, future: asyncio.Future[TLSTransport]) -> None:
        error = None if future.cancelled() else future.exception()
        if error is None:
            return
        peer = self._raw.get_extra_info("peername") if self._raw is not None else None
        logger.info("TLS handshake with %s failed: %s", peer, error)
        if self._on_error is not None:
            self._on_error(error, peer)
