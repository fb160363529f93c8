"""HBONE-style CONNECT requests as values: headers in, a target or a refusal out.

A tunnel request is an HTTP/2 CONNECT (RFC 9113 §8.5): `:method CONNECT` and
`:authority host:port`, and no `:scheme` or `:path` (h2 already refuses those). Anything
else is answered on its own stream and never reaches the app: 405 for another method, 400
for a missing or malformed authority. Pure; the inbound server acts on the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ConnectRequest", "Refusal", "parse_connect"]


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
