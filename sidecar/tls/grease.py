"""GREASE (RFC 8701): reserved values sprinkled into our messages so that a peer which
chokes on unknown values fails now, in testing, instead of freezing the protocol.

One `Grease` is drawn per handshake from the config's RNG (the engine has no other
randomness, so a handshake under a deterministic RNG stays reproducible). The client
puts its values in every list RFC 8701 §3.1 names; the server only where §4 lets it
(CertificateRequest extensions and signature_algorithms, NewSessionTicket extensions).
On receipt nothing special is needed: every list is read by lookup of the values we
know, so a GREASE value is never selected, and a peer that selects one of ours is
refused by the ordinary "you chose what we did not offer" checks (illegal_parameter).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .extensions import (
    ExtensionType,
    RawExtension,
    pull_alpn,
    pull_client_key_shares,
    pull_client_versions,
    pull_psk_modes,
    pull_uint16_list,
    push_alpn,
    push_client_key_shares,
    push_client_versions,
    push_uint16_list,
)
from .messages import ClientHello

# RFC 8701 §2: {0x0A,0x0A}, {0x1A,0x1A}, ..., {0xFA,0xFA} for cipher suites, extensions,
# named groups, signature algorithms and versions; the same two bytes as ALPN ids.
GREASE_VALUES: tuple[int, ...] = tuple(0x0A0A + 0x1010 * i for i in range(16))
# RFC 8701 §2: PskKeyExchangeMode values 0x0B, 0x2A, 0x49, ..., 0xE4 (step 0x1F).
GREASE_PSK_MODES: tuple[int, ...] = tuple(0x0B + 0x1F * i for i in range(8))


def is_grease(value: int) -> bool:
    """A 16-bit RFC 8701 reserved value."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


@dataclass(frozen=True, slots=True)
class Grease:
    """The reserved values of one handshake (varied per connection, RFC 8701 §3.1)."""

    cipher_suite: int
    extension: int  # sent empty
    extension2: int  # sent with one byte, so a peer must skip a non-empty body
    group: int  # in supported_groups and, with a one-byte share, in key_share
    signature_scheme: int
    version: int
    psk_mode: int
    alpn: bytes

    @classmethod
    def draw(cls, rng: Callable[[int], bytes]) -> Grease:
        b = rng(8)

        def pick(i: int) -> int:
            return GREASE_VALUES[b[i] % 16]

        first = pick(1)
        second = pick(2)
        if second == first:
            # RFC 8446 §4.2: one extension of a type; the two must differ.
            second ^= 0x1010
        alpn = pick(7)
        return cls(
            cipher_suite=pick(0),
            extension=first,
            extension2=second,
            group=pick(3),
            signature_scheme=pick(4),
            version=pick(5),
            psk_mode=GREASE_PSK_MODES[b[6] % 8],
            alpn=alpn.to_bytes(2, "big"),
        )


def grease_client_hello(hello: ClientHello, grease: Grease) -> ClientHello:
    """`hello` with a GREASE value at the front of each list it carries (as browsers
    place them), an empty GREASE extension first and a one-byte one last.

    Called on a hello before pre_shared_key and early_data are added, so
    pre_shared_key still ends up last (RFC 8446 §4.2.11)."""
    extensions: list[RawExtension] = [(grease.extension, b"")]
    for ext_type, data in hello.extensions:
        if ext_type == ExtensionType.supported_groups:
            data = push_uint16_list((grease.group, *pull_uint16_list(data)))
        elif ext_type == ExtensionType.key_share:
            # RFC 8701 §3.1: a share for the GREASE group, one byte long.
            shares = ((grease.group, b"\x00"), *pull_client_key_shares(data))
            data = push_client_key_shares(shares)
        elif ext_type == ExtensionType.signature_algorithms:
            data = push_uint16_list((grease.signature_scheme, *pull_uint16_list(data)))
        elif ext_type == ExtensionType.supported_versions:
            data = push_client_versions((grease.version, *pull_client_versions(data)))
        elif ext_type == ExtensionType.psk_key_exchange_modes:
            modes = (grease.psk_mode, *pull_psk_modes(data))
            data = bytes((len(modes), *modes))
        elif ext_type == ExtensionType.application_layer_protocol_negotiation:
            # Last, not first: a server picking in the client's order must not stop at
            # it (none may select it, but an old one might try the first name).
            data = push_alpn((*pull_alpn(data), grease.alpn))
        extensions.append((ext_type, data))
    extensions.append((grease.extension2, b"\x00"))
    suites = (grease.cipher_suite, *hello.cipher_suites)
    return replace(hello, cipher_suites=suites, extensions=tuple(extensions))


def grease_certificate_request(
    extensions: Sequence[RawExtension], grease: Grease
) -> tuple[RawExtension, ...]:
    """RFC 8701 §4: a server MAY send GREASE extensions and signature algorithms in a
    CertificateRequest; the client must ignore both."""
    result: list[RawExtension] = [(grease.extension, b"")]
    for ext_type, data in extensions:
        if ext_type == ExtensionType.signature_algorithms:
            data = push_uint16_list((grease.signature_scheme, *pull_uint16_list(data)))
        result.append((ext_type, data))
    result.append((grease.extension2, b"\x00"))
    return tuple(result)


def grease_ticket_extensions(
    extensions: Sequence[RawExtension], grease: Grease
) -> tuple[RawExtension, ...]:
    """RFC 8701 §4: a server MAY send GREASE extensions in NewSessionTicket."""
    return ((grease.extension, b""), *extensions)
