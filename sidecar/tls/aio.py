"""The asyncio shell around the sans-I/O engine: sockets, the clock and timers live here.

Theory of operation
-------------------
`TLSShellProtocol` is the protocol asyncio attaches to the plain TCP transport. It owns
one engine `Connection`, feeds it every chunk the socket delivers (with `now` from the
shell's clock), writes whatever `data_to_send()` returns, and turns the engine's events
into calls on the *application* protocol. The application protocol sees a
`TLSTransport`, an `asyncio.Transport` that encrypts on `write()` and sends close_notify
on `write_eof()`/`close()`, so stream readers, `h2` code and aiohttp run over it
unchanged. The application protocol's `connection_made` is called only once the
handshake completed, as with `loop.create_connection(..., ssl=...)`.

Flow control is the TCP transport's: `TLSTransport.write` seals and hands the records
straight to it, so its buffer is the only buffer, and its pause/resume_writing calls are
passed up. `pause_reading` pauses the socket and holds back events already decrypted.

Failures: a `TLSError` from the engine already has its fatal alert queued; the shell
writes it and closes the socket (asyncio flushes the buffer before closing), then reports
the error -- to whoever awaits the handshake, or as `connection_lost(exc)` afterwards. A
fatal alert from the peer becomes `PeerAlertError`; a stalled handshake `TimeoutError`.
An EOF without close_notify after the handshake is reported as EOF (as asyncio's own TLS
does) and is visible as `get_extra_info("tls_clean_close") is False`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from .alerts import AlertDescription, TLSError
from .client import ClientConnection
from .config import TLSConfig
from .connection import Connection
from .events import (
    AlertReceived,
    ApplicationData,
    ConnectionClosed,
    Event,
    HandshakeComplete,
    PeerCertificate,
    SessionTicket,
)
from .groups import NamedGroup
from .server import ServerConnection
from .signatures import SignatureScheme
from .suites import CipherSuite

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "PeerAlertError",
    "TLSClientProtocol",
    "TLSServerProtocol",
    "TLSShellProtocol",
    "TLSTransport",
    "create_tls_connection",
    "create_tls_server",
    "open_tls_connection",
    "start_tls_server",
]

logger = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
Clock = Callable[[], float]
ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class PeerAlertError(ConnectionError):
    """The peer ended the connection with a fatal alert (the alert it *sent*; a `TLSError`
    is one we detected and sent)."""

    def __init__(self, alert: AlertDescription | int) -> None:
        name = alert.name if isinstance(alert, AlertDescription) else str(alert)
        super().__init__(f"peer sent fatal alert {name}")
        self.alert = alert


def _name(enum: type[Any], value: int | None) -> str | None:
    if value is None:
        return None
    try:
        return str(enum(value).name)
    except ValueError:
        return f"0x{value:04x}"


def _cipher_tuple(suite: int) -> tuple[str, str, int]:
    """The shape `ssl.SSLSocket.cipher()` returns: (IANA name, version, secret bits)."""
    name = _name(CipherSuite, suite) or ""
    bits = 128 if suite == CipherSuite.AES_128_GCM_SHA256 else 256
    return (f"TLS_{name}", "TLSv1.3", bits)


class TLSTransport(asyncio.Transport):
    """What the application protocol writes to; records go out over the TCP transport."""

    def __init__(self, shell: TLSShellProtocol) -> None:
        super().__init__()
        self._shell = shell

    # --- asyncio.BaseTransport ---------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._shell.extra_info(name, default)

    def is_closing(self) -> bool:
        return self._shell.closing

    def close(self) -> None:
        self._shell.close()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._shell.app_protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._shell.app_protocol

    # --- reading -----------------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._shell.app_reading_paused and not self._shell.closing

    def pause_reading(self) -> None:
        self._shell.pause_reading()

    def resume_reading(self) -> None:
        self._shell.resume_reading()

    # --- writing -----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._shell.write(bytes(data))

    def write_eof(self) -> None:
        self._shell.write_eof()

    def can_write_eof(self) -> bool:
        return True  # TLS 1.3 close_notify half-closes (RFC 8446 §6.1)

    def abort(self) -> None:
        self._shell.abort()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._shell.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._shell.raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        limits: tuple[int, int] = self._shell.raw.get_write_buffer_limits()
        return limits

    # --- TLS-specific ------------------------------------------------------------------

    @property
    def tls(self) -> Connection:
        """The engine, for inspection (`negotiated`, `traffic_secrets()`)."""
        return self._shell.tls

    def update_key(self, request_peer_update: bool = True) -> None:
        """Send a KeyUpdate (RFC 8446 §4.6.3)."""
        self._shell.update_key(request_peer_update)


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
        self._delivering = False
        self.app_reading_paused = False
        self._app_connected = False
        self._app_lost = False
        self._writing_paused = False
        self._closing = False
        self._error: BaseException | None = None
        self._peer: PeerCertificate | None = None
        self._tickets: list[SessionTicket] = []
        self._clean_close: bool | None = None
        self._peer_alert: AlertDescription | int | None = None

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
            value = self._negotiated_info(name, info, tls)
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

    def _negotiated_info(self, name: str, info: HandshakeComplete, tls: Connection) -> Any:
        peer = self._peer
        if name == "peercert":
            return peer.chain[0] if peer is not None and peer.chain else None
        if name == "peercert_chain":
            return peer.chain if peer is not None else None
        if name == "spiffe_id":
            return info.peer_spiffe_id
        if name == "cipher":
            return _cipher_tuple(info.cipher_suite)
        if name == "cipher_suite":
            return _name(CipherSuite, info.cipher_suite)
        if name == "tls_version":
            return "TLSv1.3"
        if name == "tls_group":
            return _name(NamedGroup, info.group)
        if name == "signature_scheme":
            return _name(SignatureScheme, info.signature_scheme)
        if name == "alpn_protocol":
            return info.alpn_protocol
        if name == "server_name":
            return info.server_name
        if name == "tls_negotiated":
            return info
        if name == "traffic_secrets":
            return tls.traffic_secrets()
        return None

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
        self._feed(data)

    def eof_received(self) -> bool | None:
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
            # The fatal alert is queued before the close; asyncio flushes, then closes.
            self._closing = True
            self._raw.close()
            if not self._handshake.done():
                self._fail_handshake(self._error)

    def _flush(self) -> None:
        if self._tls is None or self._raw is None:
            return
        out = self._tls.data_to_send()
        if out and not self._raw.is_closing():
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
            _name(CipherSuite, info.cipher_suite),
            _name(NamedGroup, info.group),
            info.peer_spiffe_id,
        )
        self._app_connected = True
        self.app_protocol.connection_made(self._transport)
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
    ) -> None:
        super().__init__(app_protocol, config, handshake_timeout=handshake_timeout, clock=clock)
        self._server_name = server_name

    def _new_engine(self) -> Connection:
        return ClientConnection(self._config, server_name=self._server_name, now=self._clock())


class TLSServerProtocol(TLSShellProtocol):
    """`loop.create_server(lambda: TLSServerProtocol(app_factory(), config), ...)`.

    A failed handshake is logged (logger `sidecar.tls.aio`) and passed to `on_error`.
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


async def create_tls_connection(
    protocol_factory: ProtocolFactory,
    host: str,
    port: int,
    *,
    config: TLSConfig,
    server_name: str | None = None,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    clock: Clock = time.time,
    **kwargs: Any,
) -> tuple[TLSTransport, asyncio.BaseProtocol]:
    """Like `loop.create_connection(..., ssl=...)`: returns once the handshake completed.

    `server_name` defaults to `host` (an IP literal sends no SNI). Raises `TLSError`
    (we refused the peer; the alert was sent), `PeerAlertError` (it refused us),
    `TimeoutError` or `OSError`.
    """
    loop = asyncio.get_running_loop()
    app = protocol_factory()
    _, shell = await loop.create_connection(
        lambda: TLSClientProtocol(
            app,
            config,
            server_name=server_name if server_name is not None else host,
            handshake_timeout=handshake_timeout,
            clock=clock,
        ),
        host,
        port,
        **kwargs,
    )
    try:
        transport = await shell.handshake_done()
    except BaseException:
        shell.abort()
        raise
    return transport, app


async def create_tls_server(
    protocol_factory: ProtocolFactory,
    host: str | None,
    port: int,
    *,
    config: TLSConfig,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    clock: Clock = time.time,
    on_error: Callable[[BaseException, Any], None] | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """Like `loop.create_server(..., ssl=...)`; each accepted socket gets its own engine."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: TLSServerProtocol(
            protocol_factory(),
            config,
            handshake_timeout=handshake_timeout,
            clock=clock,
            on_error=on_error,
        ),
        host,
        port,
        **kwargs,
    )


async def open_tls_connection(
    host: str,
    port: int,
    *,
    config: TLSConfig,
    server_name: str | None = None,
    limit: int = 2**16,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    clock: Clock = time.time,
    **kwargs: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like `asyncio.open_connection`, over Trellis TLS."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_tls_connection(
        lambda: protocol,
        host,
        port,
        config=config,
        server_name=server_name,
        handshake_timeout=handshake_timeout,
        clock=clock,
        **kwargs,
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


async def start_tls_server(
    client_connected_cb: ClientConnected,
    host: str | None,
    port: int,
    *,
    config: TLSConfig,
    limit: int = 2**16,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    clock: Clock = time.time,
    on_error: Callable[[BaseException, Any], None] | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """Like `asyncio.start_server`: `client_connected_cb(reader, writer)` runs once the
    handshake completed; a failed handshake never reaches it (see `on_error`)."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_tls_server(
        factory,
        host,
        port,
        config=config,
        handshake_timeout=handshake_timeout,
        clock=clock,
        on_error=on_error,
        **kwargs,
    )
