"""HTTP/2 (RFC 9113) for CONNECT tunnels: sans-I/O, callbacks, and nothing else.

A sidecar session carries many CONNECT streams over one TLS connection and moves every
app byte through DATA frames, so this layer sits on the data path of every request. It
implements exactly what HBONE tunnels use -- the preface, SETTINGS, HEADERS (+
CONTINUATION) with HPACK, DATA, WINDOW_UPDATE, RST_STREAM, PING and GOAWAY, with the
stream states, flow control and error handling of RFC 9113 -- and leaves out what they
never use (server push is disabled, priorities are ignored, which the RFC allows).

Shape:

* `receive(data)` parses frames from decrypted bytes and calls the `Listener` for what
  they mean (`h2_headers`, `h2_data`, `h2_end`, `h2_reset`, `h2_window`, ...). DATA
  payloads are handed over as memoryviews of the caller's (immutable) bytes, so a byte is
  not copied between the TLS record and the app socket. A peer's protocol violation
  queues GOAWAY and raises `H2ProtocolError`; a stream-level one resets that stream only.
* The sending calls (`open_stream`, `send_headers`, `send_data`, `end_stream`, `reset`,
  `ack`, `ping`, `goaway`) append frames to an output list of parts; `take_output()`
  hands them to the TLS layer. A DATA frame is at most `record_payload` bytes with its
  header, so each fits one TLS record. Local misuse (a closed stream) raises
  `H2StateError`.

Abuse: a peer whose streams fail more often than they complete (by `RESET_BUDGET`) gets
GOAWAY(ENHANCE_YOUR_CALM); a stream fails when the peer resets it, when we reset it before
answering, or when we answer it 4xx (a policy refusal), so a peer the policy refuses is cut
off like one we serve. A header block is bounded in bytes (`MAX_HEADER_BLOCK`, encoded and
decoded) and in frames (`MAX_CONTINUATIONS`), gathered in time linear in its frames, and
opens with at most two HPACK table size updates.
Floods of control frames that make us answer (PING, SETTINGS) are bounded by the session,
which closes a connection whose peer stops reading its answers.

Flow control: we enforce the windows we advertise (a peer overrunning one gets
FLOW_CONTROL_ERROR) and reopen them only when the caller `ack()`s consumed bytes, in
WINDOW_UPDATEs batched to a quarter of the window, so a slow app reader stalls its peer
instead of making us buffer.
"""

from __future__ import annotations

import enum
import struct
from typing import Protocol

import hpack

__all__ = [
    "PREFACE",
    "ErrorCode",
    "H2ProtocolError",
    "H2StateError",
    "H2Tunnel",
    "Listener",
    "Setting",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65535
MAX_WINDOW = (1 << 31) - 1
MIN_MAX_FRAME = 1 << 14
MAX_MAX_FRAME = (1 << 24) - 1
# The most a header block may take, encoded and decoded (we advertise it as
# SETTINGS_MAX_HEADER_LIST_SIZE, RFC 9113 §6.5.2); a CONNECT request needs about 50 bytes.
MAX_HEADER_BLOCK = 64 << 10
# CONTINUATION frames one header block may span. Empty ones cost the sender 9 bytes and
# add nothing to the block's size, so only a count bounds them (the CONTINUATION floods
# of 2024: CVE-2024-27316, CVE-2024-28182, CVE-2023-45288); nghttp2 also allows 8. A
# block of MAX_HEADER_BLOCK bytes needs 4 at the smallest frame size.
MAX_CONTINUATIONS = 8
# RFC 7541 §4.2: a header block starts with at most two dynamic table size updates (the
# smallest size since the last block, then the final one). hpack spends about six times
# as much on one of these bytes as on a Huffman-coded one.
MAX_TABLE_SIZE_UPDATES = 2
MAX_STREAM_ID = (1 << 31) - 1
# Streams the peer may open that then fail (reset by either side before an answer, or
# refused 4xx), net of the streams it completes, before we call it an attack
# (CVE-2023-44487, "rapid reset": an accepted stream costs us a dial, a refused one a
# policy decision and a log line, and neither is bounded by MAX_CONCURRENT_STREAMS).
RESET_BUDGET = 200

_HEADER = struct.Struct(">BHBBL")
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(enum.IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


class H2ProtocolError(Exception):
    """The peer broke the protocol; a GOAWAY with `code` is already queued."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


class H2StateError(Exception):
    """A local call the connection's state does not allow (e.g. data on a closed stream)."""


class _StreamError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Listener(Protocol):
    """What the connection reports; all calls happen inside `receive()`."""

    def h2_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        """A request (server side: a new stream) or a response (client side)."""

    def h2_data(self, stream_id: int, data: memoryview, flow_length: int) -> None:
        """Stream data; `flow_length` (with padding) is what `ack()` must give back."""

    def h2_end(self, stream_id: int) -> None: ...
    def h2_reset(self, stream_id: int, code: int) -> None: ...
    def h2_window(self, stream_id: int) -> None:
        """Send window opened on a stream, or on the connection (0)."""

    def h2_goaway(self, last_stream_id: int, code: int, debug: bytes) -> None: ...
    def h2_ping_ack(self, payload: bytes) -> None: ...
    def h2_settings(self, changed: dict[int, int]) -> None: ...


class _Stream:
    __slots__ = (
        "local_closed",
        "recv_window",
        "refused",
        "remote_closed",
        "responded",
        "send_window",
    )

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window
        self.recv_window = recv_window  # what the peer may still send before our update
        self.local_closed = False
        self.remote_closed = False
        self.responded = False  # client: response headers seen; server: sent
        self.refused = False  # server: answered 4xx, a failure for the reset budget


class _HeaderBlock:
    """A header block still waiting for END_HEADERS: its fragments and running totals, so
    each CONTINUATION costs the same however many came before it."""

    __slots__ = ("continuations", "flags", "fragments", "size", "stream_id")

    def __init__(self, stream_id: int, flags: int, fragment: bytes) -> None:
        self.stream_id = stream_id
        self.flags = flags  # of the HEADERS frame (END_STREAM)
        self.fragments = [fragment]
        self.size = len(fragment)
        self.continuations = 0


_CONNECTION_HEADERS = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))


def _table_size_updates(block: bytes) -> int:
    """How many dynamic table size updates (RFC 7541 §6.3: `001` + a 5-bit-prefix integer)
    open `block`, counting at most one past the limit. An integer longer than any table
    size ends the count: the decoder reports it."""
    count = pos = 0
    end = len(block)
    while pos < end and block[pos] & 0xE0 == 0x20 and count <= MAX_TABLE_SIZE_UPDATES:
        count += 1
        prefix = block[pos] & 0x1F
        pos += 1
        if prefix == 0x1F:
            stop = min(end, pos + 5)  # 5 continuation bytes carry 35 bits: beyond 2^32
            while pos < stop and block[pos] & 0x80:
                pos += 1
            if pos == stop:
                break
            pos += 1
    return count


def _header_error(headers: list[tuple[bytes, bytes]], request: bool) -> str | None:
    """Why a header list is malformed (RFC 9113 §8.2, §8.3, §8.5), or None."""
    regular = False
    seen: set[bytes] = set()
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return "pseudo-header after a regular header"
            if name in seen:
                return f"duplicate {name!r}"
            seen.add(name)
            allowed = name in _REQUEST_PSEUDO if request else name == b":status"
            if not allowed:
                return f"pseudo-header {name!r} not allowed here"
        else:
            regular = True
            if name.lower() != name:
                return f"uppercase header name {name!r}"
            if name in _CONNECTION_HEADERS or (name == b"te" and value != b"trailers"):
                return f"connection-specific header {name!r}"
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            return f"forbidden character in {name!r}"
    if request:
        if b":method" not in seen:
            return "request without :method"
        method = next(v for n, v in headers if n == b":method")
        if method == b"CONNECT" and b":protocol" not in seen:
            if b":scheme" in seen or b":path" in seen:
                return "CONNECT with :scheme or :path"
            if b":authority" not in seen:
                return "CONNECT without :authority"
        elif b":path" not in seen or b":scheme" not in seen:
            return "request without :scheme or :path"
    elif b":status" not in seen:
        return "response without :status"
    return None


class H2Tunnel:
    """One HTTP/2 connection, either side (see the module docstring)."""

    def __init__(
        self,
        listener: Listener,
        *,
        client: bool,
        stream_window: int = DEFAULT_WINDOW,
        connection_window: int = DEFAULT_WINDOW,
        max_frame: int = MIN_MAX_FRAME,
        max_concurrent_streams: int = 100,
        record_payload: int = 1 << 14,
    ) -> None:
        if not MIN_MAX_FRAME <= max_frame <= MAX_MAX_FRAME:
            raise ValueError("max_frame outside 2^14..2^24-1")
        if not DEFAULT_WINDOW <= connection_window <= MAX_WINDOW:
            raise ValueError("connection_window outside 65535..2^31-1")
        if not 0 <= stream_window <= MAX_WINDOW:
            raise ValueError("stream_window outside 0..2^31-1")
        self.listener = listener
        self.client = client
        self._local_stream_window = stream_window
        self._local_connection_window = connection_window
        self._local_max_frame = max_frame
        self._local_max_streams = max_concurrent_streams
        # DATA payload per frame: header and payload in one TLS record of `record_payload`.
        self._data_chunk = record_payload - 9
        self.remote_settings: dict[int, int] = {
            Setting.HEADER_TABLE_SIZE: 4096,
            Setting.ENABLE_PUSH: 1,
            Setting.MAX_CONCURRENT_STREAMS: 1 << 31,
            Setting.INITIAL_WINDOW_SIZE: DEFAULT_WINDOW,
            Setting.MAX_FRAME_SIZE: MIN_MAX_FRAME,
            Setting.MAX_HEADER_LIST_SIZE: 1 << 31,
        }
        self.streams: dict[int, _Stream] = {}
        self.send_window = DEFAULT_WINDOW  # connection level, ours to spend
        self._recv_window = DEFAULT_WINDOW  # connection level, the peer's allowance
        self._conn_unacked = 0
        self._next_local = 1 if client else 2
        self.highest_inbound = 0
        self.goaway_sent = False
        self.goaway_received = False
        self._inbound_open = 0
        self._reset_budget = RESET_BUDGET
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = MAX_HEADER_BLOCK
        self._out: list[bytes | memoryview] = []
        self._buffer = b""
        self._preface_pending = not client
        self._settings_seen = False
        self._continuation: _HeaderBlock | None = None  # a header block in progress
        self._closed = False

    # --- output ------------------------------------------------------------------------

    def take_output(self) -> list[bytes | memoryview]:
        out, self._out = self._out, []
        return out

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def _frame(self, ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        size = len(payload)
        self._out.append(_HEADER.pack(size >> 16, size & 0xFFFF, ftype, flags, stream_id))
        if payload:
            self._out.append(payload)

    # --- starting ----------------------------------------------------------------------

    def start(self) -> None:
        """The preface (client), our SETTINGS and the connection window."""
        if self.client:
            self._out.append(PREFACE)
        settings = {
            Setting.ENABLE_PUSH: 0,
            Setting.MAX_CONCURRENT_STREAMS: self._local_max_streams,
            Setting.INITIAL_WINDOW_SIZE: self._local_stream_window,
            Setting.MAX_FRAME_SIZE: self._local_max_frame,
            Setting.MAX_HEADER_LIST_SIZE: MAX_HEADER_BLOCK,
        }
        self._frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings.items()))
        extra = self._local_connection_window - DEFAULT_WINDOW
        if extra:
            self._recv_window += extra
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(extra))

    # --- the local API -----------------------------------------------------------------

    @property
    def remote_max_streams(self) -> int:
        return self.remote_settings[Setting.MAX_CONCURRENT_STREAMS]

    @property
    def next_stream_id(self) -> int:
        return self._next_local

    def open_stream(self, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False) -> int:
        if self._closed:
            raise H2StateError("connection closed")
        if self.goaway_received:
            raise H2StateError("the peer sent GOAWAY: no new streams")
        stream_id = self._next_local
        if stream_id > MAX_STREAM_ID:
            raise H2StateError("stream identifiers exhausted")
        self._next_local += 2
        self.streams[stream_id] = _Stream(
            self.remote_settings[Setting.INITIAL_WINDOW_SIZE], self._local_stream_window
        )
        self._send_header_block(stream_id, headers, end_stream)
        if end_stream:
            self._close_local(stream_id)
        return stream_id

    def send_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False
    ) -> None:
        stream = self._open(stream_id)
        stream.responded = True
        if (stream_id & 1) != self._local_bit:
            # RFC 9110 §15.5: a 4xx says the request was at fault (403 policy, 404 no
            # target, 400/405 malformed CONNECT): the stream counts as a failed one.
            status = next((v for n, v in headers if n == b":status"), b"")
            stream.refused = status.startswith(b"4")
        self._send_header_block(stream_id, headers, end_stream)
        if end_stream:
            self._close_local(stream_id)

    def _send_header_block(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        block = self._encoder.encode(headers)
        limit = self.remote_settings[Setting.MAX_FRAME_SIZE]
        flags = END_STREAM if end_stream else 0
        first, rest = block[:limit], block[limit:]
        self._frame(HEADERS, flags | (0 if rest else END_HEADERS), stream_id, first)
        while rest:
            chunk, rest = rest[:limit], rest[limit:]
            self._frame(CONTINUATION, 0 if rest else END_HEADERS, stream_id, chunk)

    def window(self, stream_id: int) -> int:
        """How many DATA bytes may go out on `stream_id` now."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            return 0
        return max(0, min(stream.send_window, self.send_window))

    def send_data(self, stream_id: int, data: memoryview, *, end_stream: bool = False) -> int:
        """Frame as much of `data` as the windows allow; returns how many bytes went.
        `end_stream` applies only if all of it went."""
        stream = self._open(stream_id)
        allowed = min(stream.send_window, self.send_window, len(data))
        if allowed < 0:
            allowed = 0
        chunk = min(self._data_chunk, self.remote_settings[Setting.MAX_FRAME_SIZE])
        out = self._out
        pack = _HEADER.pack
        sent = 0
        while sent < allowed:
            size = min(chunk, allowed - sent)
            last = end_stream and sent + size == len(data)
            out.append(pack(0, size, DATA, END_STREAM if last else 0, stream_id))
            out.append(data[sent : sent + size])
            sent += size
        stream.send_window -= sent
        self.send_window -= sent
        if end_stream and sent == len(data):
            if not data:
                self._frame(DATA, END_STREAM, stream_id)
            self._close_local(stream_id)
        return sent

    def end_stream(self, stream_id: int) -> None:
        self._open(stream_id)
        self._frame(DATA, END_STREAM, stream_id)
        self._close_local(stream_id)

    def reset(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        """RST_STREAM; a stream we no longer know is reset anyway (the peer may not be done)."""
        if self._closed:
            return
        stream = self.streams.get(stream_id)
        if (
            stream is not None
            and (stream_id & 1) != self._local_bit
            and (stream.refused or not stream.responded)
        ):
            # A peer's stream we end before answering it, or after refusing it: it did no
            # work, like one the peer resets. The budget is checked on the peer's next
            # stream, inside `receive()`, where a connection error can be raised.
            self._reset_budget -= 1
        self._forget(stream_id)
        self._frame(RST_STREAM, 0, stream_id, _U32.pack(code))

    def ack(self, stream_id: int, length: int) -> None:
        """`length` bytes of the stream's DATA are consumed: reopen both windows."""
        if length <= 0 or self._closed:
            return
        self._conn_unacked += length
        if self._conn_unacked >= self._local_connection_window >> 2:
            increment, self._conn_unacked = self._conn_unacked, 0
            self._recv_window += increment
            self._frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment))
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return  # the peer sends nothing more on it: only the connection needs it back
        unacked = self._local_stream_window - stream.recv_window
        if unacked >= self._local_stream_window >> 2:
            stream.recv_window += unacked
            self._frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(unacked))

    def ping(self, payload: bytes) -> None:
        if len(payload) != 8:
            raise ValueError("a PING carries 8 bytes")
        self._frame(PING, 0, 0, payload)

    def goaway(self, code: int = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """GOAWAY naming the last stream we accepted; the streams up to it may finish."""
        if self._closed:
            return
        self.goaway_sent = True
        self._frame(GOAWAY, 0, 0, _GOAWAY.pack(self.highest_inbound, code) + debug)

    def _open(self, stream_id: int) -> _Stream:
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed or self._closed:
            raise H2StateError(f"stream {stream_id} is not open for sending")
        return stream

    def _close_local(self, stream_id: int) -> None:
        stream = self.streams[stream_id]
        stream.local_closed = True
        if stream.remote_closed:
            self._completed(stream_id)

    def _completed(self, stream_id: int) -> None:
        """Both sides ended the stream cleanly: a credit to the reset budget, unless we
        refused it."""
        stream = self.streams.get(stream_id)
        self._forget(stream_id)
        if stream is not None and stream.refused:
            self._reset_budget -= 1
        elif self._reset_budget < RESET_BUDGET:
            self._reset_budget += 1

    def _forget(self, stream_id: int) -> None:
        if self.streams.pop(stream_id, None) is not None and (stream_id & 1) != self._local_bit:
            self._inbound_open -= 1

    @property
    def _local_bit(self) -> int:
        return 1 if self.client else 0

    # --- input -------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Parse `data` (decrypted bytes, any split); raises H2ProtocolError after queueing
        GOAWAY when the peer broke the protocol."""
        if self._closed:
            return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        try:
            if self._preface_pending:
                if len(data) < len(PREFACE):
                    if not PREFACE.startswith(data):
                        raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad client preface")
                    self._buffer = data
                    return
                if not data.startswith(PREFACE):
                    raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad client preface")
                self._preface_pending = False
                data = data[len(PREFACE) :]
            self._parse(data)
        except H2ProtocolError as exc:
            self._fail(exc.code, str(exc))
            raise

    def _fail(self, code: ErrorCode, message: str) -> None:
        if not self._closed:
            self._frame(
                GOAWAY, 0, 0, _GOAWAY.pack(self.highest_inbound, code) + message.encode()[:200]
            )
            self._closed = True

    def _parse(self, data: bytes) -> None:
        view = memoryview(data)
        end = len(data)
        pos = 0
        limit = self._local_max_frame
        unpack = _HEADER.unpack_from
        while end - pos >= 9:
            hi, lo, ftype, flags, stream_id = unpack(data, pos)
            length = (hi << 16) | lo
            if length > limit:
                raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"{length}-byte frame")
            if end - pos - 9 < length:
                break
            body = view[pos + 9 : pos + 9 + length]
            pos += 9 + length
            stream_id &= MAX_STREAM_ID
            if not self._settings_seen and ftype != SETTINGS:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "first frame is not SETTINGS")
            if self._continuation is not None and ftype != CONTINUATION:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "header block interrupted")
            try:
                if ftype == DATA:
                    self._on_data(stream_id, flags, body)
                elif ftype == HEADERS:
                    self._on_headers(stream_id, flags, body)
                elif ftype == WINDOW_UPDATE:
                    self._on_window_update(stream_id, body)
                elif ftype == RST_STREAM:
                    self._on_rst(stream_id, body)
                elif ftype == SETTINGS:
                    self._on_settings(stream_id, flags, body)
                elif ftype == PING:
                    self._on_ping(stream_id, flags, body)
                elif ftype == GOAWAY:
                    self._on_goaway(stream_id, body)
                elif ftype == CONTINUATION:
                    self._on_continuation(stream_id, flags, body)
                elif ftype == PRIORITY:
                    if stream_id == 0:
                        raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
                    if length != 5:
                        raise _StreamError(ErrorCode.FRAME_SIZE_ERROR, "PRIORITY length")
                elif ftype == PUSH_PROMISE:
                    raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE (push is off)")
                # Unknown frame types are ignored (RFC 9113 §4.1).
            except _StreamError as exc:
                self.reset(stream_id, exc.code)
                self.listener.h2_reset(stream_id, exc.code)
            if self._closed:
                return
        if pos < end:
            self._buffer = bytes(view[pos:])

    # --- frames --------------------------------------------------------------------------

    def _inbound_state(self, stream_id: int) -> str:
        """'open' (known), 'closed' (used before) or 'idle' for a stream we do not track."""
        if stream_id in self.streams:
            return "open"
        if (stream_id & 1) == self._local_bit:
            return "closed" if stream_id < self._next_local else "idle"
        return "closed" if stream_id <= self.highest_inbound else "idle"

    def _on_data(self, stream_id: int, flags: int, body: memoryview) -> None:
        if stream_id == 0:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(body)
        if flow > self._recv_window:
            raise H2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        self._recv_window -= flow
        if flags & PADDED:
            if not body or body[0] >= flow:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
            body = body[1 : flow - body[0]]
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream is None and self._inbound_state(stream_id) == "idle":
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
            # A stream already finished (we reset it, or it ended): its bytes still
            # count on the connection window, which nobody else will give back.
            self.ack(0, flow)
            if stream is not None:
                raise _StreamError(ErrorCode.STREAM_CLOSED, "DATA after END_STREAM")
            return
        if flow > stream.recv_window:
            self.ack(0, flow)
            raise _StreamError(ErrorCode.FLOW_CONTROL_ERROR, "stream window exceeded")
        stream.recv_window -= flow
        if body or flow:
            self.listener.h2_data(stream_id, body, flow)
        if flags & END_STREAM:
            self._remote_end(stream_id)

    def _remote_end(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.remote_closed = True
        if stream.local_closed:
            self._completed(stream_id)
        self.listener.h2_end(stream_id)

    def _on_headers(self, stream_id: int, flags: int, body: memoryview) -> None:
        if stream_id == 0:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        fragment = body
        if flags & PADDED:
            if not fragment or fragment[0] >= len(fragment):
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
            fragment = fragment[1 : len(fragment) - fragment[0]]
        if flags & PRIORITY_FLAG:
            if len(fragment) < 5:
                raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "short HEADERS priority")
            fragment = fragment[5:]
        if flags & END_HEADERS:
            self._on_header_block(stream_id, flags, bytes(fragment))
        else:
            self._continuation = _HeaderBlock(stream_id, flags, bytes(fragment))

    def _on_continuation(self, stream_id: int, flags: int, body: memoryview) -> None:
        pending = self._continuation
        if pending is None or pending.stream_id != stream_id:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        # RFC 9113 §10.5.1 lets us close the connection rather than decode a block we
        # will not take; both bounds hold before the fragment is even kept.
        pending.continuations += 1
        if pending.continuations > MAX_CONTINUATIONS:
            raise H2ProtocolError(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"header block in more than {MAX_CONTINUATIONS} CONTINUATION frames",
            )
        pending.size += len(body)
        if pending.size > MAX_HEADER_BLOCK:
            raise H2ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        pending.fragments.append(bytes(body))
        if flags & END_HEADERS:
            self._continuation = None
            self._on_header_block(stream_id, pending.flags, b"".join(pending.fragments))

    def _on_header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        if _table_size_updates(block) > MAX_TABLE_SIZE_UPDATES:
            raise H2ProtocolError(
                ErrorCode.COMPRESSION_ERROR,
                f"more than {MAX_TABLE_SIZE_UPDATES} table size updates (RFC 7541 §4.2)",
            )
        # Decode first, whatever becomes of the stream: HPACK state is connection-wide. The
        # decoder stops once the decoded list passes MAX_HEADER_BLOCK (what we advertise).
        try:
            headers = [(bytes(n), bytes(v)) for n, v in self._decoder.decode(block, raw=True)]
        except hpack.HPACKError as exc:
            raise H2ProtocolError(ErrorCode.COMPRESSION_ERROR, f"HPACK: {exc}") from exc
        end = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        peer_initiated = (stream_id & 1) != self._local_bit
        if stream is None:
            if not peer_initiated or self.client:
                if self._inbound_state(stream_id) == "idle":
                    raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "HEADERS on an idle stream")
                return  # a stream we already closed
            if stream_id <= self.highest_inbound:
                raise H2ProtocolError(ErrorCode.STREAM_CLOSED, "HEADERS on a closed stream")
            self.highest_inbound = stream_id
            if self._reset_budget < 0:
                raise H2ProtocolError(
                    ErrorCode.ENHANCE_YOUR_CALM, "the peer's streams keep failing"
                )
            if self.goaway_sent:
                # RFC 9113 §6.8: streams after our GOAWAY are ignored. A few cross it in
                # flight; a peer that keeps opening them only makes us decode headers.
                self._reset_budget -= 1
                return
            if self._inbound_open >= self._local_max_streams:
                self._reset_budget -= 1  # over the limit we advertised: a failed stream
                self._frame(RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.REFUSED_STREAM))
                return
            problem = _header_error(headers, request=True)
            if problem is not None:
                self._reset_budget -= 1
                self._frame(RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.PROTOCOL_ERROR))
                return
            self.streams[stream_id] = _Stream(
                self.remote_settings[Setting.INITIAL_WINDOW_SIZE], self._local_stream_window
            )
            self._inbound_open += 1
            self.listener.h2_headers(stream_id, headers, end)
        else:
            if stream.remote_closed:
                raise _StreamError(ErrorCode.STREAM_CLOSED, "HEADERS after END_STREAM")
            if not stream.responded and not peer_initiated:
                status = next((v for n, v in headers if n == b":status"), b"")
                if _header_error(headers, request=False) is not None:
                    raise _StreamError(ErrorCode.PROTOCOL_ERROR, "malformed response headers")
                if not status.startswith(b"1"):
                    stream.responded = True
                    self.listener.h2_headers(stream_id, headers, end)
            elif not end:
                raise _StreamError(ErrorCode.PROTOCOL_ERROR, "trailers without END_STREAM")
        if end:
            self._remote_end(stream_id)

    def _on_window_update(self, stream_id: int, body: memoryview) -> None:
        if len(body) != 4:
            raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = _U32.unpack(body)[0] & MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise H2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
            self.listener.h2_window(0)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if self._inbound_state(stream_id) == "idle":
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return
        if increment == 0:
            raise _StreamError(ErrorCode.PROTOCOL_ERROR, "zero WINDOW_UPDATE")
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            raise _StreamError(ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow")
        self.listener.h2_window(stream_id)

    def _on_rst(self, stream_id: int, body: memoryview) -> None:
        if stream_id == 0:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(body) != 4:
            raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM length")
        if stream_id not in self.streams:
            if self._inbound_state(stream_id) == "idle":
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        self._forget(stream_id)
        if (stream_id & 1) != self._local_bit:
            self._reset_budget -= 1
            if self._reset_budget < 0:
                raise H2ProtocolError(
                    ErrorCode.ENHANCE_YOUR_CALM, "the peer resets the streams it opens"
                )
        self.listener.h2_reset(stream_id, _U32.unpack(body)[0])

    def _on_settings(self, stream_id: int, flags: int, body: memoryview) -> None:
        if stream_id != 0:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if len(body):
                raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if not self._settings_seen:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "first frame is a SETTINGS ACK")
            return
        if len(body) % 6:
            raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length")
        self._settings_seen = True
        changed: dict[int, int] = {}
        for offset in range(0, len(body), 6):
            key, value = _SETTING.unpack_from(body, offset)
            if key == Setting.ENABLE_PUSH and value > 1:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "ENABLE_PUSH not 0 or 1")
            if key == Setting.INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
                raise H2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE")
            if key == Setting.MAX_FRAME_SIZE and not MIN_MAX_FRAME <= value <= MAX_MAX_FRAME:
                raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
            if key == Setting.INITIAL_WINDOW_SIZE:
                delta = value - self.remote_settings[Setting.INITIAL_WINDOW_SIZE]
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
            if key == Setting.HEADER_TABLE_SIZE:
                self._encoder.header_table_size = value
            self.remote_settings[key] = value
            changed[key] = value
        self._frame(SETTINGS, ACK, 0)
        self.listener.h2_settings(changed)

    def _on_ping(self, stream_id: int, flags: int, body: memoryview) -> None:
        if stream_id != 0:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(body) != 8:
            raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PING length")
        if flags & ACK:
            self.listener.h2_ping_ack(bytes(body))
        else:
            self._frame(PING, ACK, 0, bytes(body))

    def _on_goaway(self, stream_id: int, body: memoryview) -> None:
        if stream_id != 0:
            raise H2ProtocolError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(body) < 8:
            raise H2ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY length")
        last, code = _GOAWAY.unpack_from(body)
        self.goaway_received = True
        self.listener.h2_goaway(last & MAX_STREAM_ID, code, bytes(body[8:]))
