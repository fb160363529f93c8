"""HTTP/1.1 requests in TLS 0-RTT data: which are replay-safe, and what each side does.

Early data can be replayed (RFC 8446 §8): an attacker who captured a ClientHello and the
0-RTT records behind it can send them again. The TLS engine narrows that to one use per
ticket inside a short window at the issuing replica; this module is the third defence,
the application layer of RFC 8470, for ports declared ``protocol: http``.

Which methods are replay-safe
-----------------------------
Only the *safe* methods GET, HEAD and OPTIONS (RFC 9110 §9.2.1), without a body. PUT and
DELETE are idempotent (§9.2.2) but not safe: a replay of one delayed past a later write
reverts that write (RFC 8470 §4 and RFC 8446 §E.5 warn that idempotence alone does not
make a request replay-safe). TRACE is safe but reflects the request, credentials
included; it gains nothing from 0-RTT and stays out. A request with a body
(``Content-Length`` above 0 or any ``Transfer-Encoding``) stays out whatever its method:
the body's meaning is not the method's.

Client (outbound sidecar): `replay_safe(data)` says whether the bytes the app wrote before
the stream existed are nothing but complete replay-safe requests; only then may they go
in 0-RTT, and the sidecar keeps them until the stream is answered so that a ``425`` can
be retried once the handshake has completed (RFC 8470 §5.2: the client that chose early
data retries, and never in early data).

Server (inbound sidecar): `EarlyGate` reads a stream's 0-RTT bytes. Complete replay-safe
requests go on to the app with ``Early-Data: 1`` added (RFC 8470 §5.1); anything else --
another method, a body, a request still incomplete when the early data ends, bytes that
do not parse -- is answered ``425 Too Early`` before a byte reaches the app (§5.2).

Pure: bytes in, a verdict out; the inbound sidecar acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "EARLY_DATA_HEADER",
    "MAX_EARLY_BYTES",
    "REPLAY_SAFE_METHODS",
    "EarlyGate",
    "Incomplete",
    "Serve",
    "TooEarly",
    "replay_safe",
    "scan",
]

REPLAY_SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})
EARLY_DATA_HEADER = b"Early-Data: 1\r\n"
# More early bytes than a TLS server accepts in 0-RTT (max_early_data_size, 16 KiB in
# Trellis) are not early data of an honest client: refused without parsing further.
MAX_EARLY_BYTES = 64 * 1024
_MAX_HEAD = 16 * 1024
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class Serve:
    """Every request is replay-safe: `data` is the bytes with ``Early-Data: 1`` added to
    each request head; `methods` the requests' methods in order."""

    data: bytes
    methods: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class TooEarly:
    """Answer 425: `reason` says why, for the access log."""

    reason: str


@dataclass(frozen=True, slots=True)
class Incomplete:
    """The bytes so far end inside a request head: wait for more early data."""


Verdict = Serve | TooEarly | Incomplete


def _head(data: bytes, start: int) -> tuple[bytes, int] | TooEarly | Incomplete:
    """The method of the request head at `start` and the offset past its blank line."""
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        if len(data) - start > _MAX_HEAD:
            return TooEarly("request head too large for early data")
        return Incomplete()
    lines = data[start:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    # RFC 9112 §3: method SP request-target SP HTTP-version, nothing else.
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TCHAR:
        return TooEarly("not an HTTP/1.1 request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not target:
        return TooEarly(f"not an HTTP/1.x request ({version[:16]!r})")
    if method not in REPLAY_SAFE_METHODS:
        return TooEarly(f"{method[:16].decode('ascii')} is not replay-safe")
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # RFC 9112 §5.1: no whitespace before the colon; §5.2: obs-fold is refused.
        if not colon or not name or not set(name) <= _TCHAR or b"\n" in line or b"\r" in line:
            return TooEarly("malformed header field")
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return TooEarly("a request body is not replay-safe")
        if lowered == b"content-length" and value.strip() != b"0":
            return TooEarly("a request body is not replay-safe")
    return method, end + 4


def scan(data: bytes) -> Verdict:
    """What to do with `data`, the 0-RTT bytes of one stream so far."""
    if len(data) > MAX_EARLY_BYTES:
        return TooEarly("more early data than a client sends")
    if b"\n" in data.replace(b"\r\n", b""):
        return TooEarly("bare LF in a request head")  # RFC 9112 §2.2: no lenient parsing
    pieces: list[bytes] = []
    methods: list[bytes] = []
    start = 0
    while start < len(data):
        head = _head(data, start)
        if not isinstance(head, tuple):
            return head
        method, end = head
        # Early-Data goes last, just before the blank line that ends the head.
        pieces += (data[start : end - 2], EARLY_DATA_HEADER, b"\r\n")
        methods.append(method)
        start = end
    if not methods:
        return Incomplete()
    return Serve(b"".join(pieces), tuple(methods))


def replay_safe(data: bytes) -> bool:
    """Whether `data` is nothing but complete replay-safe requests (client side)."""
    return isinstance(scan(data), Serve)


class EarlyGate:
    """One stream's 0-RTT bytes, gathered until they make a verdict.

    `feed` returns `Serve` once the bytes so far are whole replay-safe requests (the
    inbound sidecar forwards them at once: answering before the client's Finished is
    what 0-RTT is for), `TooEarly` as soon as one is not, and `Incomplete` meanwhile.
    `end` is called when the early data ends: a request still incomplete then was begun
    in replayable bytes and is refused. After `Serve`, more early bytes on the stream
    are a second early burst, which no Trellis client sends: they are refused too.
    """

    __slots__ = ("_buffer", "decided")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.decided: Serve | TooEarly | None = None

    def feed(self, data: bytes | memoryview) -> Verdict:
        if self.decided is not None:
            if isinstance(self.decided, Serve):
                return TooEarly("early data after the first requests")
            return self.decided
        self._buffer += data
        verdict = scan(bytes(self._buffer))
        if not isinstance(verdict, Incomplete):
            self.decided = verdict
            self._buffer.clear()
        return verdict

    def end(self) -> Serve | TooEarly | None:
        """The early data ended: the verdict, or None if no early byte came at all."""
        if self.decided is None and self._buffer:
            self.decided = TooEarly("request incomplete when the early data ended")
            self._buffer.clear()
        return self.decided
