"""`TLSTransport`: the `asyncio.Transport` an application protocol writes to.

It holds no state of its own: every call goes to the `TLSShellProtocol` that owns the
engine and the TCP transport, so records leave through the TCP transport's buffer, the
only buffer there is.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from ..connection import Connection
from ..events import HandshakeComplete, PeerCertificate
from ..groups import NamedGroup
from ..signatures import SignatureScheme
from ..suites import CipherSuite

if TYPE_CHECKING:
    from .protocol import TLSShellProtocol


def enum_name(enum: type[Any], value: int | None) -> str | None:
    if value is None:
        return None
    try:
        return str(enum(value).name)
    except ValueError:
        return f"0x{value:04x}"


def _cipher_tuple(suite: int) -> tuple[str, str, int]:
    """The shape `ssl.SSLSocket.cipher()` returns: (IANA name, version, secret bits)."""
    name = enum_name(CipherSuite, suite) or ""
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


def negotiated_info(
    name: str, info: HandshakeComplete, tls: Connection, peer: PeerCertificate | None
) -> Any:
    """`get_extra_info` keys that describe the finished handshake (None: not one of them)."""
    if name == "peercert":
        return peer.chain[0] if peer is not None and peer.chain else None
    if name == "peercert_chain":
        return peer.chain if peer is not None else None
    if name == "spiffe_id":
        # A plain string, as `ssl`'s extra info is; `tls_negotiated` carries the value.
        return str(info.peer_spiffe_id) if info.peer_spiffe_id is not None else None
    if name == "cipher":
        return _cipher_tuple(info.cipher_suite)
    if name == "cipher_suite":
        return enum_name(CipherSuite, info.cipher_suite)
    if name == "tls_version":
        return "TLSv1.3"
    if name == "tls_group":
        return enum_name(NamedGroup, info.group)
    if name == "signature_scheme":
        return enum_name(SignatureScheme, info.signature_scheme)
    if name == "alpn_protocol":
        return info.alpn_protocol
    if name == "server_name":
        return info.server_name
    if name == "tls_negotiated":
        return info
    if name == "traffic_secrets":
        return tls.traffic_secrets()
    return None
