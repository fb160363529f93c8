"""Extension codecs (RFC 8446 §4.2) and the typed view of a ClientHello's extensions.

Messages keep their extensions as an ordered tuple of raw `(type, data)` pairs, so a
parsed message re-serialises byte-identically; the typed views below are what the
state machines read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from .alerts import AlertDescription, TLSError
from .codec import Buffer, Writer

RawExtension = tuple[int, bytes]


class ExtensionType(IntEnum):
    server_name = 0
    max_fragment_length = 1
    status_request = 5
    supported_groups = 10
    signature_algorithms = 13
    use_srtp = 14
    heartbeat = 15
    application_layer_protocol_negotiation = 16
    signed_certificate_timestamp = 18
    client_certificate_type = 19
    server_certificate_type = 20
    padding = 21
    record_size_limit = 28
    pre_shared_key = 41
    early_data = 42
    supported_versions = 43
    cookie = 44
    psk_key_exchange_modes = 45
    certificate_authorities = 47
    oid_filters = 48
    post_handshake_auth = 49
    signature_algorithms_cert = 50
    key_share = 51
    # RFC 9849 §11.1: Encrypted ClientHello.
    ech_outer_extensions = 0xFD00
    encrypted_client_hello = 0xFE0D


_KNOWN = frozenset(int(t) for t in ExtensionType)

# RFC 8446 §4.2 table: which TLS 1.3 message may carry which extension.
ALLOWED_IN_SERVER_HELLO = frozenset(
    {ExtensionType.key_share, ExtensionType.supported_versions, ExtensionType.pre_shared_key}
)
ALLOWED_IN_HELLO_RETRY_REQUEST = frozenset(
    {
        ExtensionType.key_share,
        ExtensionType.supported_versions,
        ExtensionType.cookie,
        ExtensionType.encrypted_client_hello,  # RFC 9849 §7.2.1: the HRR confirmation
    }
)
ALLOWED_IN_ENCRYPTED_EXTENSIONS = frozenset(
    {
        ExtensionType.server_name,
        ExtensionType.max_fragment_length,
        ExtensionType.supported_groups,
        ExtensionType.use_srtp,
        ExtensionType.heartbeat,
        ExtensionType.application_layer_protocol_negotiation,
        ExtensionType.client_certificate_type,
        ExtensionType.server_certificate_type,
        ExtensionType.early_data,
        ExtensionType.record_size_limit,
        ExtensionType.encrypted_client_hello,  # RFC 9849 §7.1: retry_configs
    }
)
ALLOWED_IN_CERTIFICATE_ENTRY = frozenset(
    {ExtensionType.status_request, ExtensionType.signed_certificate_timestamp}
)


def _illegal(reason: str) -> TLSError:
    return TLSError(AlertDescription.illegal_parameter, reason)


def pull_extensions(buf: Buffer) -> tuple[RawExtension, ...]:
    """An `Extension extensions<0..2^16-1>` block; duplicates are illegal (§4.2)."""
    seen: set[int] = set()
    result: list[RawExtension] = []
    with buf.pull_block(2):
        while not buf.eof():
            ext_type = buf.pull_uint16()
            data = buf.pull_vector(2)
            if ext_type in seen:
                # RFC 8446 §4.2: "There MUST NOT be more than one extension of the same type".
                raise _illegal(f"duplicate extension {ext_type}")
            seen.add(ext_type)
            result.append((ext_type, data))
    return tuple(result)


def push_extensions(w: Writer, extensions: Iterable[RawExtension]) -> None:
    with w.push_block(2):
        for ext_type, data in extensions:
            w.push_uint16(ext_type)
            w.push_vector(2, data)


def check_response_extensions(
    extensions: Sequence[RawExtension], offered: frozenset[int], allowed: frozenset[int]
) -> None:
    """Client-side check of SH/HRR/EE/Certificate extensions (RFC 8446 §4.2).

    An extension the client did not offer is `unsupported_extension`; one it offered
    but that does not belong in this message is `illegal_parameter`.
    """
    for ext_type, _ in extensions:
        if ext_type not in offered:
            raise TLSError(AlertDescription.unsupported_extension, f"unsolicited {ext_type}")
        if ext_type not in allowed:
            raise _illegal(f"extension {ext_type} not allowed here")


def find(extensions: Sequence[RawExtension], ext_type: int) -> bytes | None:
    for t, data in extensions:
        if t == ext_type:
            return data
    return None


# --- individual extension bodies ------------------------------------------------------


def _parse(data: bytes) -> Buffer:
    return Buffer(data)


def pull_uint16_list(data: bytes, minimum: int = 2) -> tuple[int, ...]:
    """A `uint16 list<minimum..2^16-2>` (supported_groups, signature_algorithms)."""
    length = int.from_bytes(data[:2], "big")
    if len(data) != 2 + length or length < minimum or length % 2:
        raise TLSError(AlertDescription.decode_error, "bad uint16 list")
    return struct.unpack(f">{length // 2}H", data[2:])


def push_uint16_list(values: Iterable[int]) -> bytes:
    w = Writer()
    with w.push_block(2):
        for v in values:
            w.push_uint16(v)
    return w.data()


def pull_server_name(data: bytes) -> str | None:
    """RFC 6066 §3: ServerNameList; returns the host_name, if any."""
    buf = _parse(data)
    host: str | None = None
    with buf.pull_block(2) as length:
        if length == 0:
            raise TLSError(AlertDescription.decode_error, "empty server_name list")
        while not buf.eof():
            name_type = buf.pull_uint8()
            name = buf.pull_vector(2, minimum=1)
            if name_type == 0:
                if host is not None:
                    raise _illegal("two host_names")
                try:
                    host = name.decode("ascii")
                except UnicodeDecodeError as exc:
                    raise TLSError(AlertDescription.decode_error, "non-ASCII SNI") from exc
    buf.expect_end()
    return host


def push_server_name(host: str) -> bytes:
    w = Writer()
    with w.push_block(2):
        w.push_uint8(0)
        w.push_vector(2, host.encode("ascii"))
    return w.data()


def pull_alpn(data: bytes) -> tuple[bytes, ...]:
    """RFC 7301 §3.1: ProtocolNameList; empty names are a decode_error."""
    buf = _parse(data)
    names: list[bytes] = []
    with buf.pull_block(2) as length:
        if length == 0:
            raise TLSError(AlertDescription.decode_error, "empty ALPN list")
        while not buf.eof():
            names.append(buf.pull_vector(1, minimum=1))
    buf.expect_end()
    return tuple(names)


def push_alpn(names: Iterable[bytes]) -> bytes:
    w = Writer()
    with w.push_block(2):
        for name in names:
            w.push_vector(1, name)
    return w.data()


def pull_client_key_shares(data: bytes) -> tuple[tuple[int, bytes], ...]:
    buf = _parse(data)
    shares: list[tuple[int, bytes]] = []
    groups: set[int] = set()
    with buf.pull_block(2):
        while not buf.eof():
            group = buf.pull_uint16()
            share = buf.pull_vector(2, minimum=1)
            if group in groups:
                # RFC 8446 §4.2.8: one KeyShareEntry per group.
                raise _illegal("duplicate key share group")
            groups.add(group)
            shares.append((group, share))
    buf.expect_end()
    return tuple(shares)


def push_client_key_shares(shares: Iterable[tuple[int, bytes]]) -> bytes:
    w = Writer()
    with w.push_block(2):
        for group, share in shares:
            w.push_uint16(group)
            w.push_vector(2, share)
    return w.data()


def pull_server_key_share(data: bytes) -> tuple[int, bytes]:
    buf = _parse(data)
    group = buf.pull_uint16()
    share = buf.pull_vector(2, minimum=1)
    buf.expect_end()
    return group, share


def push_server_key_share(group: int, share: bytes) -> bytes:
    w = Writer()
    w.push_uint16(group)
    w.push_vector(2, share)
    return w.data()


def pull_uint16_value(data: bytes) -> int:
    buf = _parse(data)
    value = buf.pull_uint16()
    buf.expect_end()
    return value


def pull_client_versions(data: bytes) -> tuple[int, ...]:
    buf = _parse(data)
    versions: list[int] = []
    with buf.pull_block(1) as length:
        if length < 2 or length % 2:
            raise TLSError(AlertDescription.decode_error, "bad supported_versions")
        while not buf.eof():
            versions.append(buf.pull_uint16())
    buf.expect_end()
    return tuple(versions)


def push_client_versions(versions: Iterable[int]) -> bytes:
    w = Writer()
    with w.push_block(1):
        for v in versions:
            w.push_uint16(v)
    return w.data()


def pull_cookie(data: bytes) -> bytes:
    buf = _parse(data)
    cookie = buf.pull_vector(2, minimum=1)
    buf.expect_end()
    return cookie


def push_cookie(cookie: bytes) -> bytes:
    w = Writer()
    w.push_vector(2, cookie)
    return w.data()


@dataclass(frozen=True, slots=True)
class OfferedPsks:
    """RFC 8446 §4.2.11 OfferedPsks: (identity, obfuscated_ticket_age) pairs, their
    binders, and the length of the binders list with its prefix (what is cut off the
    ClientHello to get the "truncated ClientHello" the binders are computed over)."""

    identities: tuple[tuple[bytes, int], ...]
    binders: tuple[bytes, ...]
    binders_length: int


# A ClientHello is bounded at 64 KiB anyway; no client offers more than a few tickets.
MAX_PSK_IDENTITIES = 16


def pull_offered_psks(data: bytes) -> OfferedPsks:
    buf = _parse(data)
    identities: list[tuple[bytes, int]] = []
    binders: list[bytes] = []
    with buf.pull_block(2) as length:
        if length < 7:
            raise TLSError(AlertDescription.decode_error, "empty PSK identities")
        while not buf.eof():
            identity = buf.pull_vector(2, minimum=1)
            identities.append((identity, buf.pull_uint32()))
    start = buf.position
    with buf.pull_block(2) as length:
        if length < 33:
            raise TLSError(AlertDescription.decode_error, "empty PSK binders")
        while not buf.eof():
            # RFC 8446 §4.2.11: PskBinderEntry<32..255>.
            binders.append(buf.pull_vector(1, minimum=32))
    binders_length = buf.position - start
    buf.expect_end()
    if len(identities) != len(binders):
        # RFC 8446 §4.2.11: one binder per identity.
        raise _illegal("PSK identities and binders differ in number")
    if len(identities) > MAX_PSK_IDENTITIES:
        raise _illegal(f"more than {MAX_PSK_IDENTITIES} PSK identities")
    return OfferedPsks(tuple(identities), tuple(binders), binders_length)


def push_offered_psks(identities: Iterable[tuple[bytes, int]], binders: Iterable[bytes]) -> bytes:
    w = Writer()
    with w.push_block(2):
        for identity, age in identities:
            w.push_vector(2, identity)
            w.push_uint32(age)
    with w.push_block(2):
        for binder in binders:
            w.push_vector(1, binder)
    return w.data()


def pull_psk_modes(data: bytes) -> tuple[int, ...]:
    buf = _parse(data)
    modes = buf.pull_vector(1, minimum=1)
    buf.expect_end()
    return tuple(modes)


# --- typed view of a ClientHello ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientHelloExtensions:
    """What the server reads from a ClientHello, parsed once at the edge."""

    server_name: str | None
    supported_versions: tuple[int, ...] | None
    supported_groups: tuple[int, ...]
    key_shares: tuple[tuple[int, bytes], ...] | None
    signature_algorithms: tuple[int, ...] | None
    signature_algorithms_cert: tuple[int, ...] | None
    alpn: tuple[bytes, ...] | None
    cookie: bytes | None
    psk_key_exchange_modes: tuple[int, ...]
    has_pre_shared_key: bool
    has_early_data: bool
    pre_shared_key: OfferedPsks | None = None

    @classmethod
    def parse(cls, extensions: Sequence[RawExtension]) -> ClientHelloExtensions:
        values: dict[int, bytes] = dict(extensions)
        if (
            ExtensionType.pre_shared_key in values
            and extensions[-1][0] != ExtensionType.pre_shared_key
        ):
            # RFC 8446 §4.2.11: pre_shared_key MUST be the last extension.
            raise _illegal("pre_shared_key is not the last extension")

        def opt(ext: ExtensionType) -> bytes | None:
            return values.get(ext)

        sni = opt(ExtensionType.server_name)
        sv = opt(ExtensionType.supported_versions)
        sg = opt(ExtensionType.supported_groups)
        ks = opt(ExtensionType.key_share)
        sa = opt(ExtensionType.signature_algorithms)
        sac = opt(ExtensionType.signature_algorithms_cert)
        alpn = opt(ExtensionType.application_layer_protocol_negotiation)
        cookie = opt(ExtensionType.cookie)
        modes = opt(ExtensionType.psk_key_exchange_modes)
        psk = opt(ExtensionType.pre_shared_key)
        return cls(
            server_name=pull_server_name(sni) if sni is not None else None,
            supported_versions=pull_client_versions(sv) if sv is not None else None,
            supported_groups=pull_uint16_list(sg) if sg is not None else (),
            key_shares=pull_client_key_shares(ks) if ks is not None else None,
            signature_algorithms=pull_uint16_list(sa) if sa is not None else None,
            signature_algorithms_cert=pull_uint16_list(sac) if sac is not None else None,
            alpn=pull_alpn(alpn) if alpn is not None else None,
            cookie=pull_cookie(cookie) if cookie is not None else None,
            psk_key_exchange_modes=pull_psk_modes(modes) if modes is not None else (),
            has_pre_shared_key=ExtensionType.pre_shared_key in values,
            has_early_data=ExtensionType.early_data in values,
            pre_shared_key=pull_offered_psks(psk) if psk is not None else None,
        )


def is_known(ext_type: int) -> bool:
    return ext_type in _KNOWN
