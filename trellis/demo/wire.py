"""HTTP/1.1 message heads for the demo services: bytes in, frozen values out (sans-I/O).

Only what the demo needs: ``Content-Length`` bodies (no chunked transfer coding: a request
that uses one is refused with 501 rather than misread), persistent connections by
default on HTTP/1.1 (RFC 9112 §9.3) and on HTTP/1.0 only with ``Connection: keep-alive``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MAX_HEAD",
    "RequestHead",
    "ResponseHead",
    "WireError",
    "parse_request_head",
    "parse_response_head",
    "request_head",
    "response_head",
]

MAX_HEAD = 16 * 1024
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
}


class WireError(Exception):
    """A message head that cannot be read; ``status`` is what a server answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    content_length: int
    keep_alive: bool


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    content_length: int
    keep_alive: bool


def _fields(lines: list[bytes]) -> dict[bytes, bytes]:
    fields: dict[bytes, bytes] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            # RFC 9112 §5.1: no whitespace between a field name and the colon.
            raise WireError(400, f"malformed header line {line[:60]!r}")
        key = name.lower()
        value = value.strip()
        if key in fields and key == b"content-length" and fields[key] != value:
            raise WireError(400, "conflicting Content-Length values")
        fields[key] = value
    return fields


def _content_length(fields: dict[bytes, bytes]) -> int:
    if b"transfer-encoding" in fields:
        raise WireError(501, "chunked transfer coding is not supported; send Content-Length")
    raw = fields.get(b"content-length", b"0")
    if not raw.isdigit() or len(raw) > 15:
        raise WireError(400, f"bad Content-Length {raw[:20]!r}")
    return int(raw)


def _keep_alive(version: bytes, fields: dict[bytes, bytes]) -> bool:
    tokens = {t.strip().lower() for t in fields.get(b"connection", b"").split(b",")}
    if version == b"HTTP/1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


def parse_request_head(head: bytes) -> RequestHead:
    """``head`` is everything before the blank line (without the final CRLF CRLF)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1]:
        raise WireError(400, f"malformed request line {lines[0][:60]!r}")
    fields = _fields(lines[1:])
    return RequestHead(
        method=parts[0].decode("ascii", "replace"),
        target=parts[1].decode("ascii", "replace"),
        content_length=_content_length(fields),
        keep_alive=_keep_alive(parts[2], fields),
    )


def parse_response_head(head: bytes) -> ResponseHead:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit():
        raise WireError(400, f"malformed status line {lines[0][:60]!r}")
    fields = _fields(lines[1:])
    return ResponseHead(
        status=int(parts[1]),
        content_length=_content_length(fields),
        keep_alive=_keep_alive(parts[0], fields),
    )


def response_head(
    status: int, length: int, *, keep_alive: bool = True, content_type: bytes = b""
) -> bytes:
    reason = _REASONS.get(status, b"Unknown")
    extra = b"Content-Type: " + content_type + b"\r\n" if content_type else b""
    close = b"" if keep_alive else b"Connection: close\r\n"
    return b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\n%s%s\r\n" % (
        status,
        reason,
        length,
        extra,
        close,
    )


def request_head(method: str, target: str, host: str, length: int) -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (
        method.encode("ascii"),
        target.encode("ascii"),
        host.encode("ascii"),
        length,
    )
