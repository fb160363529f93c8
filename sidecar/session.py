"""One TLS connection carrying HTTP/2 CONNECT streams (HBONE-style), either side.

Theory of operation
-------------------
`Session` is the asyncio protocol on the TCP socket. Wire bytes go through a
`SecureChannel` (the TLS engine) to an `H2Tunnel` (`h2tunnel.py`, HTTP/2 for CONNECT
streams), whose callbacks reach the `StreamHandler` of each stream (a `Bridge` to one app
TCP connection). Writes go the other way: handler → HTTP/2 frames → channel → the socket,
flushed once per inbound batch.

Flow control is end-to-end and bounded:

* peer → app: received DATA is written to the app socket, and acknowledged (so
  the peer's window reopens) only while the app socket's buffer is below its high-water
  mark; a slow app reader therefore stalls the peer at one stream window.
* app → peer: `send()` writes what the stream and connection windows allow and keeps
  the rest in a per-stream buffer; the handler pauses reading its app socket until
  `stream_drained()`. When the TLS socket itself is backed up (`pause_writing`), every
  stream's app reading is paused too.

Mapping: app FIN ↔ END_STREAM, app RST ↔ RST_STREAM(CONNECT_ERROR) (RFC 9113 §8.5).

Liveness: a PING after `keepalive_interval` of silence (as seen by the keepalive timer,
so between one and two intervals after the last input); no input within
`keepalive_timeout` of it and the connection is declared dead. A GOAWAY stops new streams;
streams the peer never processed are reported retryable. `drain()` sends our GOAWAY.

Credentials: a connection carries new streams only while what authenticated it holds.
At the handshake the session notes the earliest notAfter over both chains (the peer's,
as the engine verified it, and the one we presented, leaf and intermediates alike) and
sets one timer for it -- not a per-frame check. When it fires, or when an identity update
shows that the peer's chain no longer verifies against the new bundles or that our SVID
was withdrawn, the session *retires*: GOAWAY, no new streams (inbound: REFUSED_STREAM;
outbound: the pool dials a fresh connection with the current SVID), streams in flight
get `drain_timeout` to finish, then the connection closes. Each retirement is counted in
`trellis_sidecar_connections_closed_by_us_total{reason}`. The outbound side retires
`expiry_lead` before the notAfter, so its last stream never races the inbound side's
GOAWAY at the notAfter itself (a stream refused after its first bytes went out cannot be
retried).

0-RTT (`channel.py`, `earlydata.py`): an outbound session may be dialled with a
`FirstStream`, a CONNECT whose request bytes are already in hand and replay-safe. Its
HTTP/2 preface, CONNECT and DATA are built before the TLS channel and handed to it as
the first flight, so with a resumable ticket they go as 0-RTT data; the stream is
`early` until answered, and if it is refused (``425``, REFUSED_STREAM, the connection
lost before the handshake completed) the handler may send the same bytes again.
Inbound, records that arrived as 0-RTT are fed to HTTP/2 with `receiving_early` set, so
the request callback knows a stream's CONNECT was early; callbacks registered with
`on_early_end` run when the handshake completes and the early data is over. An inbound
session of a resumption writes from the server's Finished on (0.5-RTT data, RFC 8446
§2.3): the app's answer to an early request leaves without waiting a round trip for the
client's Finished. Otherwise nothing is written before the handshake completes: frames
queue in HTTP/2 meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

from cryptography import x509

from ca.spiffeid import SpiffeId
from sidecar.ktls import KtlsClosed, KtlsUnavailable
from sidecar.tls import TLSError

from . import offload
from .appaddress import local_host
from .channel import ChannelInput, EngineChannel, KtlsChannel, SecureChannel
from .direct import DIRECT_ALPN
from .h2tunnel import ErrorCode, H2ProtocolError, H2StateError, H2Tunnel, Setting
from .metrics import Metrics

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .identity import Identity, IdentityChange

logger = logging.getLogger("sidecar.session")

__all__ = ["Session", "SessionSettings", "StreamHandler", "credentials_changed"]

STREAM_WINDOW = 1 << 20  # 1 MiB per stream: the most a slow reader can make us hold
CONNECTION_WINDOW = 16 << 20
MAX_FRAME = 1 << 16
SERVER_MAX_STREAMS = 1000
MAX_RECORD = 1 << 14  # RFC 8446 §5.1: the most plaintext one record carries
# Records a kTLS connection may send before it retires (`_count_kernel_records`): under
# a tenth of AES-GCM's 2^24.5 limit, the tightest of the three suites (32 GiB of data).
KTLS_RECORD_BUDGET = 1 << 21


class StreamHandler(Protocol):
    """The app side of one stream (implemented by `bridge.Bridge`)."""

    def stream_response(self, status: int, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """The peer's answer to our CONNECT: its status, and every header (a refusal's
        ``trellis-policy-rule`` names what refused it)."""

    def stream_data(self, data: bytes | memoryview, flow_length: int) -> None: ...
    def stream_end(self) -> None: ...
    def stream_reset(self, code: int, retryable: bool) -> None: ...
    def stream_drained(self) -> None: ...
    def session_paused(self, paused: bool) -> None: ...


@dataclass
class SessionSettings:
    direction: str  # "outbound" (we dial, client role) or "inbound"
    handshake_timeout: float = 10.0
    keepalive_interval: float = 20.0
    keepalive_timeout: float = 10.0
    max_streams: int = 100
    # Past this much unsent output while the peer does not read, the peer is only making
    # us answer (PING/SETTINGS floods). Legitimate data stays below it: app reading stops
    # at the transport's high-water mark, and DATA in flight is bounded by the peer's
    # connection window (16 MiB between Trellis sidecars, half this).
    max_write_buffer: int = 32 << 20
    # After a retirement (credentials expired or withdrawn), how long streams in flight
    # may still run before the connection closes under them.
    drain_timeout: float = 10.0
    # Retire this long before the credentials' notAfter (see the module docstring).
    expiry_lead: float = 0.0
    # Hand the record layer to the kernel after the handshake (`ktls: auto`), when it
    # has kTLS (`sidecar.offload`; a fallback is counted); HTTP/2 stays here either way.
    ktls: bool = False


@dataclass(slots=True)
class _Stream:
    handler: StreamHandler
    pending: bytearray = field(default_factory=bytearray)
    end_pending: bool = False
    sent: int = 0
    responded: bool = False
    local_closed: bool = False
    remote_closed: bool = False
    early: bool = False  # opened in the first flight: its bytes can be sent again


class EarlyStreamHandler(StreamHandler, Protocol):
    def attach_early(self, session: Session, stream_id: int) -> None:
        """The stream exists and the held bytes went out in the first flight."""


@dataclass(frozen=True, slots=True)
class FirstStream:
    """A CONNECT opened with the connection, its request bytes in the first flight."""

    authority: str
    handler: EarlyStreamHandler
    data: bytes


RequestCallback = Callable[["Session", int, list[tuple[bytes, bytes]]], None]
# (transport, channel, plaintext after the handshake, peer closed) -> None
DirectHandover = Callable[[asyncio.Transport, SecureChannel, list[bytes], bool], None]
# (now, bytes for the first flight) -> the channel; the bytes are b"" but outbound.
ChannelFactory = Callable[[float, bytes], SecureChannel]


class Session(asyncio.Protocol):
    def __init__(
        self,
        channel_factory: ChannelFactory,
        settings: SessionSettings,
        metrics: Metrics,
        *,
        on_request: RequestCallback | None = None,
        on_state: Callable[[Session], None] | None = None,
        first_stream: FirstStream | None = None,
        on_direct: DirectHandover | None = None,
    ) -> None:
        self._channel_factory = channel_factory
        self._on_direct = on_direct
        self._first = first_stream
        self._h2_started = False
        self.receiving_early = False  # inbound: feeding HTTP/2 the 0-RTT records
        self._half_rtt = False  # inbound: may write before the handshake completes
        self._early_end: list[Callable[[], None]] = []
        self.settings = settings
        self.metrics = metrics
        self.client = settings.direction == "outbound"
        self._on_request = on_request
        self._on_state = on_state
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._channel: SecureChannel | None = None
        self._h2 = H2Tunnel(
            self,
            client=self.client,
            stream_window=STREAM_WINDOW,
            connection_window=CONNECTION_WINDOW,
            max_frame=MAX_FRAME,
            max_concurrent_streams=SERVER_MAX_STREAMS,
        )
        self.streams: dict[int, _Stream] = {}
        self.peer_id: SpiffeId | None = None
        self.negotiated_group: int | None = None
        self.resumed = False  # the handshake resumed with a ticket
        self.early_data = "none"  # 0-RTT: "none" (not offered), "accepted", "rejected"
        self.write_paused = False
        self.goaway_received = False
        self.draining = False
        self.dead = False
        self._batch = False
        self._started = time.monotonic()
        self.last_active = self._started
        self._last_rx = self._started  # as of the last keepalive tick that saw input
        self._rx_seen = False
        self._established = False
        self._timer: asyncio.TimerHandle | None = None
        self._ping_sent: float | None = None
        self.streams_opened = 0
        self.peername: str = ""
        self.arrived_on: str | None = None  # our address the peer dialled (sidecar.appaddress)
        self.peer_alert: str | None = None  # the alert that ended an established connection
        self.expires_at: float | None = None  # POSIX time: the chains' earliest notAfter
        self.retired: str | None = None  # why we stopped taking streams, if we did
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self.data_path = "user-space"  # "ktls" once the kernel seals and opens records
        self._kernel_records = 0  # records the kernel sealed for us, at most

    # --- state for the pool ----------------------------------------------------------

    @property
    def handshake_done(self) -> bool:
        return self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None

    def can_open(self) -> bool:
        if self.dead or self.goaway_received or self.draining or not self.handshake_done:
            return False
        limit = min(self.settings.max_streams, self._h2.remote_max_streams)
        return len(self.streams) < limit and self._h2.next_stream_id < (1 << 30)

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peername = f"{peer[0]}:{peer[1]}" if peer else ""
        self.arrived_on = local_host(transport)
        now = time.time()
        early, early_id = self._first_flight()
        try:
            self._channel = self._channel_factory(now, early)
        except Exception as exc:
            logger.warning("cannot start TLS: %s", exc)
            # The first stream's handler was never attached: the dial's failure is
            # the pool's to report, not a stream reset to retry.
            self.streams.pop(early_id, None)
            self._fail(exc)
            return
        first = self._channel.initial()
        if first:
            transport.write(first)
        if self._first is not None:
            self._first.handler.attach_early(self, early_id)
        self._timer = self._loop.call_later(self.settings.handshake_timeout, self._tick)

    def _start_h2(self) -> None:
        if not self._h2_started:
            self._h2_started = True
            self._h2.start()

    def _first_flight(self) -> tuple[bytes, int]:
        """The preface, the first stream's CONNECT and its request, as bytes for the
        channel to send first (0-RTT when it can), and the stream's id."""
        first = self._first
        if first is None:
            return b"", 0
        self._start_h2()
        stream_id = self._h2.open_stream(
            [(b":method", b"CONNECT"), (b":authority", first.authority.encode())]
        )
        # Within the default 64 KiB windows the peer's SETTINGS cannot have shrunk yet
        # (RFC 9113 §6.9.2): the pool offers no more than fits.
        sent = self._h2.send_data(stream_id, memoryview(first.data)) if first.data else 0
        self.streams[stream_id] = _Stream(first.handler, sent=sent, early=True)
        self.streams_opened += 1
        self.last_active = time.monotonic()
        return b"".join(bytes(part) for part in self._h2.take_output()), stream_id

    def data_received(self, data: bytes) -> None:
        channel = self._channel
        if channel is None or self.dead:
            return
        self._rx_seen = True
        try:
            # The clock matters only for certificate validity, i.e. until the handshake.
            received, out = channel.receive(data, None if self._established else time.time())
        except TLSError as exc:
            self._write_raw(channel.pending())
            self._fail(exc, reason=exc.alert.name)
            return
        if out:
            self._write_raw(out)
        self._half_rtt = received.half_rtt
        if received.early:
            self._receive_early(received.early)
        if received.handshake is not None:
            if self._hand_over(received):
                return
            self._handshake_complete(received.handshake.peer_spiffe_id)
        if received.plaintext:
            self._receive_h2(received.plaintext)
        if received.closed:
            if not self.ready.done():
                reason = f"peer alert {received.peer_alert}" if received.peer_alert else "eof"
                self._fail(ConnectionResetError(reason), reason=received.peer_alert or "eof")
            else:
                # TLS 1.3 clients finish before the server has checked their certificate
                # (RFC 8446 §4.4.2): a refusal arrives as an alert just after.
                self.peer_alert = received.peer_alert
                self._lost(None)

    def eof_received(self) -> bool | None:
        self.data_received(b"") if self._channel is not None else None
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in list(self.streams.values()):
            stream.handler.session_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.handler.session_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self._fail(exc or ConnectionResetError("closed during the TLS handshake"), "eof")
        self._lost(exc)

    # --- handshake -----------------------------------------------------------------------

    def _handshake_complete(self, peer_id: SpiffeId | None) -> None:
        channel = self._channel
        assert channel is not None
        info = channel.negotiated
        assert info is not None
        self.peer_id = peer_id
        self._established = True
        self.negotiated_group = info.group
        self.resumed = info.session_resumed
        self.early_data = info.early_data
        self.metrics.handshake_done(info, self.settings.direction, time.monotonic() - self._started)
        if self.settings.ktls:
            self._to_kernel()
        self._start_h2()
        early_end, self._early_end = self._early_end, []
        for callback in early_end:
            callback()  # the early data is over: RFC 8446 §4.5 EndOfEarlyData came first
        self._flush()
        self._cancel_timer()
        self._timer = self._loop.call_later(self.settings.keepalive_interval, self._tick)
        self._schedule_expiry(channel.peer_chain, channel.local_chain)
        self.ready.set_result(None)
        self._notify()

    def _hand_over(self, received: ChannelInput) -> bool:
        """Inbound: a caller that chose the direct protocol (`sidecar.direct`) gets no
        HTTP/2; `on_direct` takes the socket, the channel and the plaintext so far."""
        info, channel, transport = received.handshake, self._channel, self._transport
        if (
            self._on_direct is None
            or info is None
            or info.alpn_protocol != DIRECT_ALPN
            or channel is None
            or transport is None
        ):
            return False
        self.peer_id = channel.peer_id
        self.metrics.handshake_done(info, self.settings.direction, time.monotonic() - self._started)
        self._cancel_timer()
        self.dead = True  # this object is done with the socket
        self._transport = None
        self.ready.set_result(None)
        self.closed.set_result(None)
        self._notify()
        self._on_direct(transport, channel, received.plaintext, received.closed)
        return True

    def _to_kernel(self) -> None:
        """Records to the kernel from here on (`sidecar.offload`): writes stay on the
        transport, reads go through recvmsg on a duplicate of its socket."""
        channel, transport = self._channel, self._transport
        if not isinstance(channel, EngineChannel) or transport is None:
            return
        if not offload.kernel_ready():
            return
        transport.pause_reading()
        try:
            switched = offload.switch(transport, channel)
        except KtlsUnavailable as exc:
            logger.warning("kTLS switch with %s failed half-way: %s", self.peername, exc)
            self._lost(exc)
            return
        if switched is None:
            transport.resume_reading()
            return
        self._channel = KtlsChannel(channel, switched)
        self.data_path = "ktls"
        self._loop.add_reader(switched.fileno(), self._kernel_readable)

    def _kernel_readable(self) -> None:
        channel = self._channel
        if not isinstance(channel, KtlsChannel) or self.dead:
            return
        for _ in range(16):  # a bounded share of the loop per wake-up
            try:
                data = channel.ktls.recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                return  # half a record so far
            except (KtlsClosed, OSError) as exc:
                logger.info("kTLS connection with %s ended: %s", self.peername, exc)
                self._lost(exc)
                return
            self.data_received(data)
            if not data or self.dead:
                return

    def _release_kernel(self) -> None:
        channel = self._channel
        if isinstance(channel, KtlsChannel) and channel.ktls.sock.fileno() >= 0:
            self._loop.remove_reader(channel.ktls.fileno())
            channel.ktls.sock.close()

    # --- credentials -----------------------------------------------------------------------

    def _schedule_expiry(
        self, peer: tuple[x509.Certificate, ...], local: tuple[x509.Certificate, ...]
    ) -> None:
        """One timer for the earliest notAfter of either chain (RFC 5280 §4.1.2.5: the
        certificate is valid through notAfter, and not a second later)."""
        ends = [(c.not_valid_after_utc.timestamp(), "peer_certificate_expired") for c in peer]
        ends += [(c.not_valid_after_utc.timestamp(), "local_certificate_expired") for c in local]
        if not ends:
            return
        expires_at, reason = min(ends)
        self.expires_at = expires_at
        now = time.time()
        delay = expires_at - self.settings.expiry_lead - now
        if delay <= 0:
            # Born inside the lead window: use it until the notAfter itself rather than
            # retire at once and have the pool dial again and again.
            delay = expires_at - now
        self._expiry_timer = self._loop.call_later(max(delay, 0.0), self.retire, reason)

    def retire(self, reason: str) -> None:
        """Stop taking new streams (GOAWAY), give the open ones `drain_timeout`, close.
        `reason` labels `trellis_sidecar_connections_closed_by_us_total`."""
        if self.dead or self.retired is not None:
            return
        self.retired = reason
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        self.metrics.connections_closed.labels(reason=reason).inc()
        logger.info(
            "retiring the connection with %s (%s): %d streams in flight",
            self.peer_id or self.peername,
            reason,
            len(self.streams),
        )
        self._drain_timer = self._loop.call_later(self.settings.drain_timeout, self._drain_over)
        self.drain(debug=reason.encode())

    def _drain_over(self) -> None:
        self._drain_timer = None
        if self.dead:
            return
        if self.streams:
            logger.info(
                "closing the connection with %s: %d streams outlived the drain timeout",
                self.peer_id or self.peername,
                len(self.streams),
            )
        self.abort_all(ErrorCode.CANCEL)
        self.close()

    def credentials_changed(self, identity: Identity, change: IdentityChange) -> None:
        """Retire if `change` withdrew the SVID we presented, or the peer's chain no
        longer verifies against the bundles (a root removed from the trust bundle)."""
        channel = self._channel
        if channel is None or not self._established or self.dead or self.retired is not None:
            return
        if change.withdrawn and not identity.presents(channel.local_chain):
            self.retire("identity_withdrawn")
            return
        if self.peer_id is not None and self.peer_id.trust_domain.name in change.roots_removed:
            why = identity.distrust_reason(
                channel.peer_chain, peer_is_server=self.client, now=dt.datetime.now(dt.UTC)
            )
            if why is not None:
                logger.info("the peer %s is no longer trusted: %s", self.peer_id, why)
                self.retire("trust_bundle_changed")

    def _fail(self, exc: BaseException, reason: str = "error") -> None:
        if not self.ready.done():
            self.metrics.handshake_failures.labels(
                direction=self.settings.direction, reason=reason
            ).inc()
            logger.info("TLS handshake with %s failed: %s", self.peername, exc)
            self.ready.set_exception(exc)
            self.ready.exception()  # nobody may await it (an inbound session)
        self.dead = True
        if self._transport is not None:
            self._transport.close()

    # --- HTTP/2 ------------------------------------------------------------------------

    def on_early_end(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the 0-RTT data is over (the handshake completed)."""
        self._early_end.append(callback)

    def _receive_early(self, records: list[bytes]) -> None:
        # Our SETTINGS must be the first frame we send (RFC 9113 §3.4), ahead of any
        # answer to the client's: queue them before the client's frames are read.
        self._start_h2()
        if self.peer_id is None and self._channel is not None:
            # RFC 8446 §4.2.11: 0-RTT data is authenticated by the PSK, which the ticket
            # binds to the identity of the connection that earned it (verified again by
            # the engine against today's bundles): the caller policy decides on that.
            self.peer_id = self._channel.peer_id
        self.receiving_early = True
        try:
            self._receive_h2(records)
        finally:
            self.receiving_early = False

    def _receive_h2(self, records: list[bytes]) -> None:
        self._batch = True
        try:
            # Record by record: joining first would copy every byte once more, and
            # memory bandwidth is what bulk transfer runs out of first.
            for record in records:
                self._h2.receive(record)
        except H2ProtocolError as exc:
            logger.info("HTTP/2 protocol error from %s: %s", self.peername, exc)
            abuse = exc.code == ErrorCode.ENHANCE_YOUR_CALM
            self.metrics.connections_closed.labels(
                reason="abuse" if abuse else "protocol_error"
            ).inc()
            self._batch = False
            self._flush_now()  # the GOAWAY
            self.abort_all(ErrorCode.PROTOCOL_ERROR)
            if self._transport is not None:
                self._transport.close()
            return
        finally:
            self._batch = False
        self._flush_now()

    # H2Tunnel's listener: called from inside `_receive_h2`.

    def h2_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        if self.client:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.responded = True
                stream.handler.stream_response(_status(headers), headers)
        elif self.draining or self._on_request is None:
            self._h2.reset(stream_id, ErrorCode.REFUSED_STREAM)
        else:
            self._on_request(self, stream_id, headers)

    def h2_data(self, stream_id: int, data: memoryview, flow_length: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            # A stream we already finished (reset/refused): give the window back.
            self._h2.ack(stream_id, flow_length)
        elif data:
            stream.handler.stream_data(data, flow_length)
        else:
            self.ack(stream_id, flow_length)

    def h2_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.remote_closed = True
            stream.handler.stream_end()
            self._maybe_forget(stream_id)

    def h2_reset(self, stream_id: int, code: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            retryable = (
                code == ErrorCode.REFUSED_STREAM
                and (stream.sent == 0 or stream.early)
                and not stream.responded
            )
            stream.handler.stream_reset(code, retryable)
            self._notify()

    def h2_window(self, stream_id: int) -> None:
        if stream_id == 0:
            for sid in list(self.streams):
                self._drain(sid)
        else:
            self._drain(stream_id)

    def h2_goaway(self, last_stream_id: int, code: int, debug: bytes) -> None:
        self._goaway(last_stream_id, code)

    def h2_ping_ack(self, payload: bytes) -> None:
        self._ping_sent = None

    def h2_settings(self, changed: dict[int, int]) -> None:
        if Setting.INITIAL_WINDOW_SIZE in changed:
            for stream_id in list(self.streams):
                self._drain(stream_id)
        self._notify()

    def _goaway(self, last_stream_id: int, error_code: int) -> None:
        self.goaway_received = True
        # RFC 9113 §6.8: last_stream_id counts the streams *we* initiated (odd as the
        # client); those above it were never processed. A client's GOAWAY says nothing
        # about the streams it opened on a server, which run to their end.
        parity = 1 if self.client else 0
        for stream_id in [s for s in self.streams if s > last_stream_id and s % 2 == parity]:
            stream = self.streams.pop(stream_id)
            stream.handler.stream_reset(ErrorCode.REFUSED_STREAM, stream.sent == 0 or stream.early)
        self._notify()
        if not self.streams and self._transport is not None:
            self.close()

    # --- stream API (for bridges, the pool and the inbound server) -----------------------

    def open_stream(self, authority: str, handler: StreamHandler) -> int:
        stream_id = self._h2.open_stream(
            [(b":method", b"CONNECT"), (b":authority", authority.encode())]
        )
        self.streams[stream_id] = _Stream(handler)
        self.streams_opened += 1
        self.last_active = time.monotonic()
        self._flush()
        return stream_id

    def accept_stream(self, stream_id: int, handler: StreamHandler) -> None:
        self.streams[stream_id] = _Stream(handler, responded=True)
        self.streams_opened += 1
        self.last_active = time.monotonic()

    def respond(
        self,
        stream_id: int,
        status: int,
        headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        end: bool = False,
    ) -> None:
        if self.dead:
            return
        try:
            self._h2.send_headers(
                stream_id, [(b":status", str(status).encode()), *headers], end_stream=end
            )
        except H2StateError:
            return
        if end:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.local_closed = True
                self._maybe_forget(stream_id)
        self._flush()

    def refuse(
        self, stream_id: int, status: int, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """A final status (and ``headers``), then RST_STREAM(NO_ERROR): we will not read the
        request body (RFC 9113 §8.1 allows a complete response before the request ends)."""
        self.streams.pop(stream_id, None)
        if self.dead:
            return
        try:
            self._h2.send_headers(
                stream_id, [(b":status", str(status).encode()), *headers], end_stream=True
            )
            self._h2.reset(stream_id, ErrorCode.NO_ERROR)
        except H2StateError:
            pass
        self._flush()
        self._notify()

    def send(self, stream_id: int, data: bytes) -> bool:
        """Queue app bytes; True if all went out, False if some wait for window."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed or self.dead:
            return True
        stream.sent += len(data)
        if stream.pending:
            stream.pending += data
            return False
        try:
            # The frames keep views of `data` until the next flush: it must be immutable.
            sent = self._h2.send_data(stream_id, memoryview(data))
        except H2StateError as exc:
            logger.info("stream %d on %s cannot send: %s", stream_id, self.peername, exc)
            self.streams.pop(stream_id, None)
            self._loop.call_soon(stream.handler.stream_reset, ErrorCode.CANCEL, False)
            return True
        if not self._batch:
            self._flush_now()
        if sent < len(data):
            stream.pending += memoryview(data)[sent:]
            return False
        return True

    def _drain(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or (not stream.pending and not stream.end_pending):
            return
        try:
            if stream.pending:
                pending = bytes(stream.pending)  # immutable while its frames wait
                sent = self._h2.send_data(stream_id, memoryview(pending))
                stream.pending = bytearray(memoryview(pending)[sent:])
            if stream.pending:
                return
            if stream.end_pending:
                stream.end_pending = False
                self._end_now(stream_id, stream)
        except H2StateError:
            return
        self._flush()
        stream.handler.stream_drained()

    def end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed or self.dead:
            return
        if stream.pending:
            stream.end_pending = True
            return
        self._end_now(stream_id, stream)
        self._flush()

    def _end_now(self, stream_id: int, stream: _Stream) -> None:
        with contextlib.suppress(H2StateError):
            self._h2.end_stream(stream_id)
        stream.local_closed = True
        self._maybe_forget(stream_id)

    def reset(self, stream_id: int, code: int = ErrorCode.CONNECT_ERROR) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None or self.dead:
            return
        self._h2.reset(stream_id, code)
        self._flush()
        self._notify()

    def ack(self, stream_id: int, length: int) -> None:
        if self.dead or not length:
            return
        self._h2.ack(stream_id, length)
        self._flush()

    def _maybe_forget(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.local_closed and stream.remote_closed:
            del self.streams[stream_id]
            self.last_active = time.monotonic()
            self._notify()
            if (self.goaway_received or self.draining) and not self.streams:
                self._loop.call_soon(self.close)

    # --- output ------------------------------------------------------------------------

    def _flush(self) -> None:
        if not self._batch:
            self._flush_now()

    def _flush_now(self) -> None:
        # Before the handshake completes the engine seals application data only as a
        # resumed server's 0.5-RTT data: otherwise frames (our SETTINGS, answers to
        # 0-RTT requests) wait in HTTP/2 until then.
        if (
            self._h2.has_output
            and self._channel is not None
            and (self._established or self._half_rtt)
        ):
            data = self._channel.seal_parts(self._h2.take_output())
            if self.data_path == "ktls" and data:
                self._count_kernel_records(len(data))
            self._write_raw(data)

    def _count_kernel_records(self, size: int) -> None:
        """The kernel cannot rekey before Linux 6.14, so a kTLS connection must never
        need a KeyUpdate: retire it while its records are well within the AEAD's limit
        (RFC 8446 §5.5: 2^24.5 full-size records for AES-GCM). A write may become one
        more record than its size needs when the socket takes it in two sends."""
        self._kernel_records += -(-size // MAX_RECORD) + 1
        if self._kernel_records >= KTLS_RECORD_BUDGET and self.retired is None:
            self.retire("record_limit")

    def _write_raw(self, data: bytes) -> None:
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            if (
                self.write_paused
                and transport.get_write_buffer_size() > self.settings.max_write_buffer
            ):
                logger.warning(
                    "%s does not read what it makes us send (%d bytes queued): closing",
                    self.peername,
                    transport.get_write_buffer_size(),
                )
                self.metrics.connections_closed.labels(reason="peer_not_reading").inc()
                transport.abort()

    # --- lifecycle -----------------------------------------------------------------------

    def drain(self, debug: bytes = b"") -> None:
        """Send GOAWAY: no new streams; close once the open ones finished. `debug` is
        the GOAWAY's opaque debug data (RFC 9113 §6.8), here the reason."""
        if self.draining or self.dead:
            return
        self.draining = True
        if self.handshake_done:
            self._h2.goaway(debug=debug)
            self._flush()
        self._notify()
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        if self.handshake_done and not self.draining:
            self.draining = True
            self._h2.goaway()
            self._flush()
        if self._channel is not None:
            self._write_raw(self._channel.close())
        channel = self._channel
        if isinstance(channel, KtlsChannel) and not self._transport.get_write_buffer_size():
            # close_notify is a control record (sendmsg): only behind what is written.
            channel.ktls.close()
        self._transport.close()

    def abort_all(self, code: int) -> None:
        for stream_id, stream in list(self.streams.items()):
            del self.streams[stream_id]
            stream.handler.stream_reset(code, False)

    def _lost(self, exc: BaseException | None) -> None:
        if self.closed.done():
            return
        self.dead = True
        self._cancel_timer()
        self._release_kernel()
        for timer in (self._expiry_timer, self._drain_timer):
            if timer is not None:
                timer.cancel()
        self._expiry_timer = self._drain_timer = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            # Dead before any app byte went out, or before a first-flight request could
            # have been answered: the opener may retry it elsewhere.
            stream.handler.stream_reset(
                ErrorCode.CONNECT_ERROR,
                (stream.sent == 0 or stream.early) and not stream.responded,
            )
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self.closed.set_result(None)
        self._notify()

    def _notify(self) -> None:
        if self._on_state is not None:
            self._on_state(self)

    # --- timers --------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        if self.dead:
            return
        if not self.ready.done():
            self._fail(TimeoutError("TLS handshake timed out"), "timeout")
            if self._transport is not None:
                self._transport.abort()
            return
        now = time.monotonic()
        interval = self.settings.keepalive_interval
        if self._rx_seen:
            # Input since the last tick (noted with a flag: reading the clock on every
            # read costs more than the keepalive's precision is worth).
            self._rx_seen = False
            self._last_rx = now
            self._ping_sent = None
        if self._ping_sent is not None:
            if now - self._ping_sent >= self.settings.keepalive_timeout:
                logger.info("connection to %s missed its keepalive: closing", self.peername)
                self.metrics.connections_closed.labels(reason="keepalive_timeout").inc()
                if self._transport is not None:
                    self._transport.abort()
                return
            delay = self._ping_sent + self.settings.keepalive_timeout - now
        elif now - self._last_rx >= interval:
            self._ping_sent = now
            self._h2.ping(os.urandom(8))
            self._flush()
            delay = self.settings.keepalive_timeout
        else:
            delay = self._last_rx + interval - now
        self._timer = self._loop.call_later(max(delay, 0.05), self._tick)


def _status(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b":status":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def credentials_changed(
    sessions: Iterable[Session], identity: Identity, change: IdentityChange
) -> None:
    """`Session.credentials_changed` for each of `sessions` (an `Identity` listener)."""
    for session in list(sessions):
        session.credentials_changed(identity, change)
