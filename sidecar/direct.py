"""Direct mode: one TLS connection per app connection, its bytes relayed unframed.

An upstream with ``mode: direct`` gets no pool and no HTTP/2: each app connection dials
the peer sidecar's inbound port with the ALPN protocol `DIRECT_ALPN` instead of ``h2``.
The inbound `Session` sees that protocol at the end of the handshake and hands the
connection over here (`Session.on_direct`). After the handshake the client sends one
line, the CONNECT authority (``host:port\\n``); the server authorises the peer for that
port exactly as it does a CONNECT stream (`sidecar.inbound`), dials the app and answers
one line, ``200`` or the refusal's status and reason; after that, bytes go both ways
unchanged, a TLS close_notify standing for the app's FIN (RFC 8446 §6.1: each side
closes its own write direction). A refusal closes the TLS connection after its line.

Why a mode apart from the pool: with kTLS (`sidecar.ktls`) a direct connection's payload
can move between the app socket and the TLS socket with `splice(2)` through a pipe,
never entering user space; HTTP/2 framing cannot be spliced. Without kTLS, or with
``ktls: off``, the relay runs the engine's record layer in user space, still one TLS
connection per app connection. `DirectLink.data_path` says which one a connection uses.

Flow control is the transports' own: a full write buffer on either side pauses reading
the other side (as in `sidecar.relay`), so nothing is buffered without bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import cast

from ca.spiffeid import SpiffeId
from sidecar.ktls import KtlsUnavailable
from sidecar.tls import TLSConfig, TLSError

from .channel import EngineChannel, SecureChannel
from .identity import Identity
from .metrics import Metrics
from .offload import kernel_ready, splice_relay, switch

logger = logging.getLogger("sidecar.direct")

__all__ = [
    "DIRECT_ALPN",
    "DirectError",
    "DirectLink",
    "ServerConfigs",
    "Verdict",
    "client_channel",
    "dial",
]

DIRECT_ALPN = "trellis-direct"
# The authority line and the status line are short; a peer that sends more before its
# newline is not speaking this protocol.
MAX_LINE = 1024


class DirectError(ConnectionError):
    """The peer refused the connection (its status line), or broke the protocol."""


def client_channel(identity: Identity, expected: tuple[SpiffeId, ...], now: float) -> EngineChannel:
    """The engine as a direct connection's client: the pool's configuration offering
    `DIRECT_ALPN` alone, and no ticket slot (a direct connection neither resumes nor
    files tickets: its first bytes are the authority line, not a replay-safe request)."""
    config = replace(identity.client_config(expected), alpn_protocols=(DIRECT_ALPN,))
    return EngineChannel(config, client=True, now=now)


class ServerConfigs:
    """The inbound configuration offering ``h2`` first and `DIRECT_ALPN` beside it,
    derived once per configuration the identity hands out (a new SVID makes a new one)."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self._base: TLSConfig | None = None
        self._derived: TLSConfig | None = None

    def get(self) -> TLSConfig:
        base = self._identity.server_config()
        if base is not self._base or self._derived is None:
            protocols = (*base.alpn_protocols, DIRECT_ALPN)
            self._base, self._derived = base, replace(base, alpn_protocols=protocols)
        return self._derived


# (status, reason, app transport when the status is 200)
Verdict = tuple[int, str, asyncio.Transport | None]
# Inbound: (peer SPIFFE ID, authority, the link) -> the verdict, the app dialled on 200.
Acceptor = Callable[[SpiffeId | None, str, "DirectLink"], Awaitable[Verdict]]


class _AppSide(asyncio.Protocol):
    """The app's socket: what it sends is sealed onto the TLS connection."""

    def __init__(
        self, link: DirectLink, on_made: Callable[[asyncio.Transport], None] | None = None
    ) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self._on_made = on_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self._on_made is not None:
            # Outbound: an app connection on a direct upstream's port; it is read once
            # the TLS connection is up (what arrives meanwhile waits in the link).
            self.transport.pause_reading()
            self._on_made(self.transport)

    def data_received(self, data: bytes) -> None:
        self.link.app_data(data)

    def eof_received(self) -> bool:
        self.link.app_eof()
        return True  # the TLS side decides when both directions are over

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.app_lost(exc)

    def pause_writing(self) -> None:
        self.link.pause_tls_reading(True)

    def resume_writing(self) -> None:
        self.link.pause_tls_reading(False)


class DirectLink(asyncio.Protocol):
    """One direct connection: the TLS socket's protocol, relaying to one app socket."""

    def __init__(
        self,
        channel_factory: Callable[[float], SecureChannel] | None,
        metrics: Metrics,
        *,
        direction: str,
        authority: str = "",
        acceptor: Acceptor | None = None,
        kernel: bool = False,
    ) -> None:
        """Outbound: `channel_factory` makes the client channel, `authority` is sent
        first. Inbound: built by `adopt` with `acceptor` deciding on the authority."""
        self._factory = channel_factory
        self.metrics = metrics
        self.direction = direction
        self.authority = authority
        self._acceptor = acceptor
        self._kernel = kernel  # switch to kTLS and splice once the status line is behind
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.channel: SecureChannel | None = None
        self.app: asyncio.Transport | None = None
        self.peer_id: SpiffeId | None = None
        self.peername = ""
        self.data_path = "user-space"  # or "ktls+splice" once the kernel relays it
        self.bytes_up = 0  # app -> peer
        self.bytes_down = 0
        self._line = bytearray()
        self._answered = False  # the status line is behind us (either side)
        self._held: list[bytes] = []  # peer bytes that came before the app was attached
        self._held_eof = False
        self._up_held: list[bytes] = []  # app bytes that came before the peer's 200
        self._peer_eof = False
        self._app_eof = False
        self._started = time.monotonic()

    # --- set-up ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Outbound only: the inbound side is adopted with the handshake done.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peername = f"{peer[0]}:{peer[1]}" if peer else ""
        assert self._factory is not None
        try:
            self.channel = self._factory(time.time())
        except Exception as exc:  # no SVID yet (IdentityError) and the like
            self._fail(DirectError(f"cannot start TLS: {exc}"))
            return
        self.transport.write(self.channel.initial())

    def adopt(
        self,
        transport: asyncio.Transport,
        channel: SecureChannel,
        plaintext: list[bytes],
        closed: bool,
    ) -> None:
        """Inbound: take over an established connection from the `Session`, with the
        plaintext that arrived with the handshake's last flight."""
        self.transport = transport
        self.channel = channel
        self.peer_id = channel.peer_id
        peer = transport.get_extra_info("peername")
        self.peername = f"{peer[0]}:{peer[1]}" if peer else ""
        transport.set_protocol(self)
        for chunk in plaintext:
            self._plaintext(chunk)
        if closed:
            self._peer_closed()

    def attach_app(self, app: asyncio.Transport) -> None:
        """The app's socket is connected: flush what the peer sent meanwhile."""
        self.app = app
        held, self._held = self._held, []
        for chunk in held:
            self._to_app(chunk)
        if self._held_eof:
            self._peer_closed()

    def app_protocol(
        self, on_made: Callable[[asyncio.Transport], None] | None = None
    ) -> asyncio.Protocol:
        return _AppSide(self, on_made)

    # --- TLS socket -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        channel = self.channel
        if channel is None or self.closed.done():
            return
        handshaking = channel.negotiated is None
        try:
            received, out = channel.receive(data, time.time() if handshaking else None)
        except TLSError as exc:
            self._write(channel.pending())
            self._fail(DirectError(f"TLS: {exc}"))
            return
        self._write(out)
        if received.handshake is not None:
            self._client_established()
        for chunk in received.plaintext:
            self._plaintext(chunk)
        if received.closed:
            if not self.ready.done():
                self._fail(DirectError(f"closed by the peer ({received.peer_alert or 'eof'})"))
            else:
                self._peer_closed()

    def eof_received(self) -> bool:
        self.data_received(b"")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self._fail(DirectError(f"connection lost: {exc or 'eof'}"))
        if self.app is not None and not self.app.is_closing():
            self.app.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_reading()

    def resume_writing(self) -> None:
        if self.app is not None and not self.app.is_closing():
            self.app.resume_reading()

    def pause_tls_reading(self, paused: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _client_established(self) -> None:
        channel = self.channel
        assert channel is not None and channel.negotiated is not None
        info = channel.negotiated
        self.peer_id = channel.peer_id
        self.metrics.handshake_done(info, self.direction, time.monotonic() - self._started)
        if info.alpn_protocol != DIRECT_ALPN:
            self._fail(DirectError(f"the peer chose ALPN {info.alpn_protocol!r}"))
            return
        self._send(self.authority.encode() + b"\n")

    def _plaintext(self, chunk: bytes) -> None:
        if self._answered:
            self._to_app(chunk)
            return
        self._line += chunk
        end = self._line.find(b"\n")
        if end < 0:
            if len(self._line) > MAX_LINE:
                self._fail(DirectError("no line within the first 1 KiB"))
            return
        line, rest = bytes(self._line[:end]), bytes(self._line[end + 1 :])
        self._line.clear()
        self._answered = True
        if self.direction == "outbound":
            self._status(line)
        else:
            self._request(line)
        if rest:
            self._to_app(rest)

    def _status(self, line: bytes) -> None:
        status, _, reason = line.decode("utf-8", "replace").partition(" ")
        if status != "200":
            self._fail(DirectError(f"refused: {status} {reason}".rstrip()))
            return
        self.ready.set_result(None)
        held, self._up_held = self._up_held, []
        for data in held:
            self._send(data)
        if self._app_eof and self.channel is not None:
            self._write(self.channel.close())

    def _request(self, line: bytes) -> None:
        assert self._acceptor is not None and self.transport is not None
        # Nothing more from the peer until the app is there (or the answer is no).
        self.transport.pause_reading()
        task = self._loop.create_task(self._decide(line.decode("utf-8", "replace")))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _decide(self, authority: str) -> None:
        assert self._acceptor is not None
        self.authority = authority
        status, reason, app = await self._acceptor(self.peer_id, authority, self)
        if status != 200 or app is None:
            self._send(f"{status} {reason}\n".encode())
            self.close()
            if not self.ready.done():
                self.ready.set_exception(DirectError(f"{status} {reason}"))
                self.ready.exception()
            return
        self._send(b"200\n")
        self.ready.set_result(None)
        self.attach_app(app)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        await self.offload()

    # --- kernel ---------------------------------------------------------------------------

    async def offload(self) -> None:
        """Both sockets to the kernel: kTLS, then `splice` both ways (`sidecar.offload`).
        Stays in user space when the kernel cannot, or a write buffer does not drain."""
        tls, app, channel = self.transport, self.app, self.channel
        if not self._kernel or tls is None or app is None or self.closed.done():
            return
        if not isinstance(channel, EngineChannel) or not kernel_ready():
            return
        tls.pause_reading()
        app.pause_reading()
        # What the engine sealed and the app was sent must be out before the kernel takes
        # over: bounded, a slow reader keeps its connection in user space.
        for _ in range(200):
            if not (tls.get_write_buffer_size() or app.get_write_buffer_size()):
                break
            await asyncio.sleep(0.005)
        if tls.is_closing() or app.is_closing():
            return
        try:
            switched = switch(tls, channel)
        except KtlsUnavailable as exc:
            self._fail(DirectError(str(exc)))
            return
        if switched is None:
            tls.resume_reading()
            app.resume_reading()
            return
        app_sock = socket.socket(fileno=os.dup(app.get_extra_info("socket").fileno()))
        for transport in (tls, app):
            # The duplicates hold the connections; the transports close their own fds.
            transport.set_protocol(asyncio.Protocol())
            transport.abort()
        self.data_path = "ktls+splice"
        loop = self._loop

        def done(error: str | None) -> None:
            loop.call_soon_threadsafe(self._spliced, error)

        splice_relay(switched, app_sock, done)

    def _spliced(self, error: str | None) -> None:
        if error is not None:
            logger.info("direct connection %s: %s", self.peername, error)
        if not self.closed.done():
            self.closed.set_result(None)

    # --- relaying -------------------------------------------------------------------------

    def _to_app(self, chunk: bytes) -> None:
        if self.app is None:
            self._held.append(chunk)
            return
        self.bytes_down += len(chunk)
        if self.direction == "inbound":
            self.metrics.bytes.inbound += len(chunk)
        if not self.app.is_closing():
            self.app.write(chunk)

    def _peer_closed(self) -> None:
        # close_notify (or EOF after it): the peer's app sent its FIN.
        if self.app is None:
            self._held_eof = True
            return
        self._peer_eof = True
        if not self.app.is_closing() and self.app.can_write_eof():
            self.app.write_eof()
        self._maybe_done()

    def app_data(self, data: bytes) -> None:
        self.bytes_up += len(data)
        if self.direction == "outbound":
            self.metrics.bytes.outbound += len(data)
        if not self.ready.done():
            self._up_held.append(data)  # the engine seals nothing before the handshake
            return
        self._send(data)

    def app_eof(self) -> None:
        self._app_eof = True
        if self.channel is not None and self.ready.done():
            self._write(self.channel.close())  # close_notify: our half is over
        self._maybe_done()

    def app_lost(self, exc: Exception | None) -> None:
        if exc is not None or not self._app_eof:
            # A reset, or closed without a FIN reaching us: end the whole connection.
            self.close()

    def _maybe_done(self) -> None:
        if self._peer_eof and self._app_eof:
            self.close()

    def _send(self, data: bytes) -> None:
        if self.channel is not None and data:
            self._write(self.channel.seal_parts([data]))

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    # --- ending ---------------------------------------------------------------------------

    def _fail(self, exc: DirectError) -> None:
        logger.info("direct connection %s: %s", self.peername, exc)
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # the dialler may be gone
        self.close()

    def close(self) -> None:
        if self.channel is not None and self.channel.negotiated is not None:
            self._write(self.channel.close())
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self.app is not None and not self.app.is_closing():
            self.app.close()

    def describe(self) -> dict[str, object]:
        return {
            "peer": str(self.peer_id) if self.peer_id is not None else None,
            "authority": self.authority,
            "data_path": self.data_path,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }


async def dial(
    link: DirectLink, app: asyncio.Transport, host: str, port: int, timeout: float
) -> None:
    """Outbound: connect `link` to the peer sidecar at (`host`, `port`) and relay `app`
    once the peer answered 200; any failure resets the app's connection, as a refused
    stream does (`sidecar.bridge`)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: link, host, port)
            await asyncio.shield(link.ready)
    except (OSError, TimeoutError, DirectError) as exc:
        logger.info("direct connection to %s:%d for %s: %s", host, port, link.authority, exc)
        link.close()
        if not link.closed.done():  # never connected: no connection_lost will say so
            link.closed.set_result(None)
        app.abort()
        return
    link.attach_app(app)
    if not app.is_closing():
        app.resume_reading()
    await link.offload()
