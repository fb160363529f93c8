"""HBONE-style CONNECT requests as values: headers in, a target or a refusal out.

A tunnel request is an HTTP/2 CONNECT (RFC 9113 §8.5): `:method CONNECT` and
`:authority host:port`, and no `:scheme` or `:path` (h2 already refuses those). Anything
else is answered on its own stream and never reaches the app: 405 for another method, 400
for a missing or malformed authority. Pure; the inbound server acts on the result.

A policy refusal (403) names what refused it, so the caller learns why where its protocol
lets it: ``trellis-policy-rule`` carries the rule (``sidecar.policy.Decision.rule``), and
``trellis-app-protocol: http`` says the refused app speaks HTTP, in which case the caller's
sidecar answers its app an HTTP/1.1 ``403 Forbidden`` naming the rule (`http_forbidden`)
instead of resetting the connection. Both are read with `denial_of`. A 200 carries
``trellis-app-protocol: http`` too when the app speaks HTTP (`app_protocol_headers`,
read with `speaks_http`): the caller's sidecar then knows that safe requests to it may
ride in TLS 0-RTT (`sidecar.earlydata`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "APP_PROTOCOL",
    "POLICY_RULE",
    "ConnectRequest",
    "Denial",
    "Refusal",
    "app_protocol_headers",
    "denial_headers",
    "denial_of",
    "http_forbidden",
    "parse_connect",
    "speaks_http",
]

POLICY_RULE = b"trellis-policy-rule"
APP_PROTOCOL = b"trellis-app-protocol"
MAX_RULE_LENGTH = 256  # a name, not a document: the peer's header is cut here too


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    host: str
    port: int

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str


def parse_connect(headers: Sequence[tuple[bytes, bytes]]) -> ConnectRequest | Refusal:
    method = authority = None
    for name, value in headers:
        if name == b":method":
            method = value
        elif name == b":authority":
            authority = value
        elif name == b":protocol":
            return Refusal(400, "extended CONNECT is not supported")
    if method != b"CONNECT":
        return Refusal(405, f"method {method!r} is not CONNECT")
    if not authority:
        return Refusal(400, "CONNECT without :authority")
    try:
        text = authority.decode("ascii")
    except UnicodeDecodeError:
        return Refusal(400, "non-ASCII :authority")
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or len(port_text) > 5:
        return Refusal(400, f"authority {text!r} is not host:port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        return Refusal(400, f"port {port} out of range")
    return ConnectRequest(host, port)


@dataclass(frozen=True, slots=True)
class Denial:
    """What a peer's 403 said about itself: the rule that refused, and whether the app
    behind it speaks HTTP."""

    rule: str
    http: bool


def _field_value(text: str) -> str:
    """RFC 9110 §5.5: a field value is visible ASCII, space and tab (RFC 9113 §8.2.1
    refuses CR, LF and NUL outright); anything else becomes ``?`` so that a name can never
    split a header here, or a line of the HTTP/1.1 answer built from it."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_RULE_LENGTH]).strip()


def denial_headers(rule: str, *, http: bool) -> list[tuple[bytes, bytes]]:
    """The headers of a policy 403 beside ``:status``."""
    headers = [(POLICY_RULE, _field_value(rule).encode("ascii"))]
    if http:
        headers.append((APP_PROTOCOL, b"http"))
    return headers


def app_protocol_headers(*, http: bool) -> list[tuple[bytes, bytes]]:
    """The headers of a 200 beside ``:status``."""
    return [(APP_PROTOCOL, b"http")] if http else []


def speaks_http(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a peer's answer says the app behind it speaks HTTP."""
    return (APP_PROTOCOL, b"http") in headers


def denial_of(headers: Sequence[tuple[bytes, bytes]]) -> Denial | None:
    """A peer's refusal as `Denial`, or None when it named no rule (an older peer)."""
    rule: str | None = None
    http = False
    for name, value in headers:
        if name == POLICY_RULE:
            rule = _field_value(value.decode("ascii", "replace"))
        elif name == APP_PROTOCOL:
            http = value == b"http"
    return None if rule is None else Denial(rule, http)


def http_forbidden(rule: str) -> bytes:
    """The HTTP/1.1 answer an app gets when the peer's policy refused its connection
    (RFC 9110 §15.5.4); ``Connection: close`` because nothing more will be read."""
    name = _field_value(rule)
    body = f"403 Forbidden: denied by {name}\n".encode("ascii")
    head = (
        "HTTP/1.1 403 Forbidden\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Trellis-Policy-Rule: {name}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
