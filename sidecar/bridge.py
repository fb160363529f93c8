"""`Bridge`: one plaintext app TCP connection spliced onto one CONNECT stream.

The same class serves both directions: outbound it is the protocol of a connection the
app made to us; inbound it is the protocol of our connection to the local app. It is the
`StreamHandler` of its stream (see `session.py` for the flow-control story).

Reading from the app is paused for any of three reasons (tracked as a set): the stream
is not attached yet, the stream's send buffer waits for HTTP/2 window, or the TLS socket
underneath is backed up. Received stream DATA is acknowledged (window reopened) only
while the app socket accepts writes.

TCP ↔ HTTP/2: app FIN → END_STREAM; END_STREAM → FIN to the app; an app RST (or an
abort) → RST_STREAM(CONNECT_ERROR); RST_STREAM → an RST to the app (SO_LINGER 0).

0-RTT (outbound): `attach_early` is the stream of a fresh connection whose first flight
already carried the app's held request (`session.FirstStream`). The bytes are kept, and
the app is not read further, until the peer answers: a ``425 Too Early`` (RFC 8470
§5.2: the client that sent early data retries, once the handshake is complete, and not
in early data) or a refused or lost stream puts them back in front for the next stream;
a 200 drops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Sequence
from typing import cast

from .h2tunnel import ErrorCode
from .metrics import Metrics
from .session import Session

__all__ = ["Bridge"]

_LINGER_RST = struct.pack("ii", 1, 0)


class Bridge(asyncio.Protocol):
    def __init__(
        self,
        metrics: Metrics,
        direction: str,
        *,
        on_retry: Callable[[Bridge], bool] | None = None,
        on_done: Callable[[Bridge, str], None] | None = None,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.direction = direction  # "outbound": the app dialled us
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.stream_id = 0
        self._paused: set[str] = {"unattached"}
        self._early: list[bytes] = []  # app bytes read before the stream existed
        self._early_eof = False
        # Sent in a connection's first flight, kept until the stream is answered.
        self._replay: list[bytes] | None = None
        self.early_attempted = False  # one 0-RTT try per app connection
        self._held_waiter: asyncio.Future[None] | None = None
        self.waited_held = False
        # Stream data that arrived before the app socket was connected.
        self._inbound_early: list[tuple[bytes | memoryview, int]] = []
        self._inbound_end = False
        self._app_write_paused = False
        self._unacked = 0
        self._app_eof = False  # the app sent FIN
        self._peer_eof = False  # the stream sent END_STREAM
        self._finished = False
        self._counted = False
        self._on_retry = on_retry
        self._on_done = on_done
        self._on_connected = on_connected
        self.bytes_up = 0
        self.bytes_down = 0
        self.retries = 0
        self._bytes = metrics.bytes

    # --- attaching ---------------------------------------------------------------------

    def attach(self, session: Session, stream_id: int) -> None:
        """The stream exists: flush what the app already sent, start reading."""
        self.session = session
        self.stream_id = stream_id
        if not self._counted:
            self._counted = True
            self.metrics.streams_active.labels(direction=self.direction).inc()
        early, self._early = self._early, []
        for chunk in early:
            self._up(chunk)
        if self._early_eof:
            session.end(stream_id)
        if session.write_paused:
            self._paused.add("session")
        self._unpause("unattached")

    def held_request(self) -> bytes | None:
        """The app's bytes held before any stream, if it has not half-closed: what a
        first flight could carry."""
        if self._early_eof or self.session is not None:
            return None
        return b"".join(self._early)

    async def wait_held(self, timeout: float) -> None:
        """Until the app has written something (or half-closed), at most `timeout`."""
        self.waited_held = True
        if self._early or self._early_eof or self.session is not None:
            return
        waiter = self._held_waiter = asyncio.get_running_loop().create_future()
        # Unattached bridges do not read; read once now (data_received pauses again).
        self._set_reading(True)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            pass
        finally:
            self._held_waiter = None

    def _wake_held(self) -> None:
        if self._held_waiter is not None and not self._held_waiter.done():
            self._held_waiter.set_result(None)

    def attach_early(self, session: Session, stream_id: int) -> None:
        """The stream exists and the held bytes already went out in the first flight."""
        self.session = session
        self.stream_id = stream_id
        self.early_attempted = True
        if not self._counted:
            self._counted = True
            self.metrics.streams_active.labels(direction=self.direction).inc()
        self._replay, self._early = self._early, []
        sent = sum(len(chunk) for chunk in self._replay)
        self.bytes_up += sent
        self._bytes.outbound += sent
        if session.write_paused:
            self._paused.add("session")
        self._paused.add("early")  # nothing more until the answer: it may be a 425
        self._unpause("unattached")

    def _rewind(self) -> None:
        """Put bytes sent on an early stream back in front, for the next stream."""
        if self._replay is not None:
            resent = sum(len(chunk) for chunk in self._replay)
            self.bytes_up -= resent
            self._bytes.outbound -= resent
            self._early, self._replay = self._replay + self._early, None
            self._paused.discard("early")

    def detach_for_retry(self) -> None:
        if self._counted:
            self._counted = False
            self.metrics.streams_active.labels(direction=self.direction).dec()
        self.metrics.streams.labels(direction=self.direction, outcome="retried").inc()
        self.session = None
        self.stream_id = 0
        self.retries += 1
        self._pause("unattached")

    # --- asyncio.Protocol: the app socket ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.metrics.app_connections.labels(direction=self.direction).inc()
        if self._on_connected is not None:
            self._on_connected()  # inbound: the 200 must precede any reply byte
        if "unattached" in self._paused:
            self._set_reading(False)
        # Inbound: stream bytes that arrived while we dialled the app.
        pending, self._inbound_early = self._inbound_early, []
        for data, length in pending:
            self.stream_data(data, length)
        if self._inbound_end:
            self.stream_end()

    def data_received(self, data: bytes) -> None:
        if self.session is None:
            self._early.append(data)
            self._set_reading(False)
            self._wake_held()
            return
        self._up(data)

    def _up(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        if self._paused:
            self._set_reading(False)
        self.bytes_up += len(data)
        self._bytes.outbound += len(data)
        if not session.send(self.stream_id, data):
            self._pause("window")

    def eof_received(self) -> bool:
        self._app_eof = True
        if self.session is None:
            self._early_eof = True
            self._wake_held()
        else:
            self.session.end(self.stream_id)
        self._check_done()
        return True  # keep our write side open: the peer may still be talking

    def pause_writing(self) -> None:
        self._app_write_paused = True

    def resume_writing(self) -> None:
        self._app_write_paused = False
        if self._unacked and self.session is not None:
            unacked, self._unacked = self._unacked, 0
            self.session.ack(self.stream_id, unacked)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._finished:
            return
        session = self.session
        if session is not None:
            if exc is not None or not self._app_eof:
                session.reset(self.stream_id, ErrorCode.CONNECT_ERROR)
                self._done("reset")
            else:
                session.end(self.stream_id)
                self._done("ok")
        else:
            self._done("reset")

    # --- StreamHandler: the stream side --------------------------------------------------

    def stream_response(self, status: int, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        if self._replay is not None:
            if status == 425 and self._on_retry is not None and self.session is not None:
                # RFC 8470 §5.2: sent in early data and too early; the handshake is
                # complete by now (the peer answers only after our Finished), so the
                # retry is an ordinary stream.
                self.session.reset(self.stream_id, ErrorCode.CANCEL)
                self.stream_reset(ErrorCode.REFUSED_STREAM, True)
                return
            self._replay = None
            self._unpause("early")
        if status != 200:
            # Refused by the peer (403 policy, 404 target, 503 app down): the app sees
            # its connection reset, as from a firewall, not a half-open socket.
            outcome = "refused" if status == 403 else "error"
            if self.session is not None:
                self.session.reset(self.stream_id, ErrorCode.CANCEL)
            self._rst_app()
            self._done(outcome)

    def stream_data(self, data: bytes | memoryview, flow_length: int) -> None:
        transport = self.transport
        if transport is None:
            if self.direction == "inbound" and not self._finished:
                self._inbound_early.append((data, flow_length))
            elif self.session is not None:
                self.session.ack(self.stream_id, flow_length)  # nobody to deliver to
            return
        self.bytes_down += len(data)
        self._bytes.inbound += len(data)
        transport.write(data)
        if self._app_write_paused:
            self._unacked += flow_length
        elif self.session is not None:
            self.session.ack(self.stream_id, flow_length)

    def stream_end(self) -> None:
        self._peer_eof = True
        transport = self.transport
        if transport is None:
            if self.direction == "inbound":
                self._inbound_end = True
            return
        if transport.can_write_eof():
            transport.write_eof()
        self._check_done()

    def stream_reset(self, code: int, retryable: bool) -> None:
        if self._finished:
            return
        if retryable and self._on_retry is not None and self.retries < 2:
            self._rewind()
            self.detach_for_retry()
            if self._on_retry(self):
                return
        self._return_window()
        self.session = None
        self._rst_app()
        self._done("reset")

    def stream_drained(self) -> None:
        self._unpause("window")

    def session_paused(self, paused: bool) -> None:
        if paused:
            self._pause("session")
        else:
            self._unpause("session")

    # --- helpers -------------------------------------------------------------------------

    def refuse(self) -> None:
        """No stream could be opened (no healthy endpoint): reset the app connection."""
        self._rst_app()
        self._done("error")

    def _rst_app(self) -> None:
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        transport.abort()

    def _check_done(self) -> None:
        if self._app_eof and self._peer_eof and self.transport is not None:
            self._done("ok")
            self.transport.close()

    def _done(self, outcome: str) -> None:
        if self._finished:
            return
        self._finished = True
        self._return_window()
        if self._counted:
            self._counted = False
            self.metrics.streams_active.labels(direction=self.direction).dec()
        self.metrics.streams.labels(direction=self.direction, outcome=outcome).inc()
        if self._on_done is not None:
            self._on_done(self, outcome)

    def _return_window(self) -> None:
        """Bytes the peer sent that will never reach the app still count against the
        connection's window: acknowledge them, or every such stream shrinks it for good."""
        leftover = self._unacked + sum(length for _, length in self._inbound_early)
        self._unacked = 0
        self._inbound_early = []
        if leftover and self.session is not None and self.stream_id:
            self.session.ack(self.stream_id, leftover)

    def _pause(self, reason: str) -> None:
        self._paused.add(reason)
        self._set_reading(False)

    def _unpause(self, reason: str) -> None:
        self._paused.discard(reason)
        if not self._paused:
            self._set_reading(True)

    def _set_reading(self, on: bool) -> None:
        # Ask the transport, not a cached flag: uvloop may start reading an accepted
        # socket after connection_made() paused it.
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if on != transport.is_reading():
            if on:
                transport.resume_reading()
            else:
                transport.pause_reading()
