"""Encrypted ClientHello (RFC 9849): ECHConfigs, the extension and the confirmations.

The client sends a ClientHelloOuter naming only the public name, with the real
ClientHelloInner sealed under the server's HPKE key in `encrypted_client_hello`; the
outer hello is the AAD (§5.2). The server (shared mode, §7.1) trial-decrypts with its
current and previous keys; it accepts by writing 8 bytes of `accept_confirmation` into
ServerHello.random (§7.2), or rejects and completes the outer handshake with the public
name's certificate and `retry_configs` (§7.1).

This module holds what both sides share: ECHConfig and ECHConfigList (§4), the
`encrypted_client_hello` extension (§5) and the acceptance confirmations (§7.2).
`ech_client.py` seals and `ech_server.py` opens; `client.py` and `server.py` call them
where the handshake reaches them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .alerts import AlertDescription, TLSError
from .codec import Buffer, Writer
from .extensions import RawExtension, pull_extensions, push_extensions
from .hpke import AeadId, KdfId, KemId
from .keyschedule import hkdf_expand_label, hkdf_extract
from .messages import (
    ServerHello,
    push_server_hello,
)
from .suites import SuiteParams

ECH_VERSION = 0xFE0D
EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D
EXT_ECH_OUTER_EXTENSIONS = 0xFD00
OUTER, INNER = 0, 1
TAG_LENGTH = 16  # Nt of every AEAD in hpke.AeadId
_CONFIRMATION_LENGTH = 8

SUPPORTED_SUITES = frozenset((KdfId.HKDF_SHA256, int(a)) for a in AeadId)


def illegal(reason: str) -> TLSError:
    return TLSError(AlertDescription.illegal_parameter, reason)


def decode_failure(reason: str) -> TLSError:
    return TLSError(AlertDescription.decode_error, reason)


class ECHConfigError(ValueError):
    """An ECHConfig or ECHConfigList that cannot be used (a configuration mistake)."""


# --- ECHConfig (§4) ---------------------------------------------------------------------

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def valid_public_name(name: str) -> bool:
    """§4 and §6.1.7: a DNS name, not an IP literal, whose last label is not numeric
    (the WHATWG IPv4 parser would read such a name as an address)."""
    name = name.lower()
    if not name or len(name) > 255 or name.endswith(".") or not name.isascii():
        return False
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return False
    last = labels[-1]
    if last.isdigit() or (last.startswith("0x") and all(c in "0123456789abcdef" for c in last[2:])):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


@dataclass(frozen=True, slots=True)
class ECHConfig:
    """One ECHConfig of version 0xfe0d. `raw` is its whole encoding (version and
    length included): the HPKE `info` is "tls ech" || 0x00 || raw (§6.1)."""

    config_id: int
    kem_id: int
    public_key: bytes
    cipher_suites: tuple[tuple[int, int], ...]
    maximum_name_length: int
    public_name: str
    extensions: tuple[RawExtension, ...] = ()
    raw: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        if not self.raw:
            object.__setattr__(self, "raw", _push_config(self))

    @property
    def info(self) -> bytes:
        return b"tls ech\x00" + self.raw

    def usable(self) -> bool:
        """§6.1: the client supports the KEM and a suite, every mandatory extension
        (high bit of the type set, §4.2) and the public name is valid."""
        return (
            self.kem_id == KemId.DHKEM_X25519_HKDF_SHA256
            and len(self.public_key) == 32
            and any(s in SUPPORTED_SUITES for s in self.cipher_suites)
            and not any(t & 0x8000 for t, _ in self.extensions)
            and valid_public_name(self.public_name)
        )

    def suite(self) -> tuple[int, int]:
        return next(s for s in self.cipher_suites if s in SUPPORTED_SUITES)


def _push_config(config: ECHConfig) -> bytes:
    w = Writer()
    w.push_uint16(ECH_VERSION)
    with w.push_block(2):
        w.push_uint8(config.config_id)
        w.push_uint16(config.kem_id)
        w.push_vector(2, config.public_key)
        with w.push_block(2):
            for kdf_id, aead_id in config.cipher_suites:
                w.push_uint16(kdf_id)
                w.push_uint16(aead_id)
        w.push_uint8(config.maximum_name_length)
        w.push_vector(1, config.public_name.encode("ascii"))
        push_extensions(w, config.extensions)
    return w.data()


def push_config_list(configs: Iterable[ECHConfig]) -> bytes:
    w = Writer()
    w.push_vector(2, b"".join(c.raw for c in configs))
    return w.data()


def _pull_contents(body: bytes, raw: bytes) -> ECHConfig:
    buf = Buffer(body)
    config_id = buf.pull_uint8()
    kem_id = buf.pull_uint16()
    public_key = buf.pull_vector(2, minimum=1)
    suites: list[tuple[int, int]] = []
    with buf.pull_block(2) as length:
        if length < 4 or length % 4:
            raise decode_failure("bad HpkeSymmetricCipherSuite list")
        while not buf.eof():
            suites.append((buf.pull_uint16(), buf.pull_uint16()))
    maximum_name_length = buf.pull_uint8()
    name = buf.pull_vector(1, minimum=1)
    extensions = pull_extensions(buf)
    buf.expect_end()
    try:
        public_name = name.decode("ascii")
    except UnicodeDecodeError as exc:
        raise decode_failure("public_name is not ASCII") from exc
    return ECHConfig(
        config_id, kem_id, public_key, tuple(suites), maximum_name_length, public_name,
        extensions, raw,
    )  # fmt: skip


def pull_config_list(data: bytes) -> tuple[ECHConfig, ...]:
    """An ECHConfigList (§4): every config of version 0xfe0d, usable or not; configs of
    other versions are skipped by their length, as §4 lets a client do. A list that does
    not parse is a decode_error (TLSError), whatever it came in."""
    buf = Buffer(data)
    configs: list[ECHConfig] = []
    with buf.pull_block(2) as length:
        if length < 4:
            raise decode_failure("empty ECHConfigList")
        while not buf.eof():
            start = buf.position
            version = buf.pull_uint16()
            body = buf.pull_vector(2)
            if version == ECH_VERSION:
                configs.append(_pull_contents(body, data[start : buf.position]))
    buf.expect_end()
    return tuple(configs)


def parse_config_list(data: bytes) -> tuple[ECHConfig, ...]:
    """The usable configs of an ECHConfigList given by configuration: ECHConfigError if
    it does not parse or none is usable (§6.1: the client then offers no ECH)."""
    try:
        configs = pull_config_list(data)
    except TLSError as exc:
        raise ECHConfigError(f"malformed ECHConfigList: {exc.reason}") from exc
    usable = tuple(c for c in configs if c.usable())
    if not usable:
        raise ECHConfigError("no usable ECHConfig (version, KEM, suites, extensions, name)")
    return usable


@dataclass(frozen=True, slots=True)
class ECHKey:
    """A server's ECH key: the config it publishes and its X25519 private key."""

    config: ECHConfig
    private_key: X25519PrivateKey


def generate_ech_key(config_id: int, public_name: str, maximum_name_length: int = 64) -> ECHKey:
    """A fresh key and its config, suites AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305."""
    if not valid_public_name(public_name):
        raise ECHConfigError(f"invalid public name {public_name!r}")
    key = X25519PrivateKey.generate()
    config = ECHConfig(
        config_id,
        KemId.DHKEM_X25519_HKDF_SHA256,
        key.public_key().public_bytes_raw(),
        tuple((KdfId.HKDF_SHA256, int(a)) for a in AeadId),
        maximum_name_length,
        public_name,
    )
    return ECHKey(config, key)


# --- the extension (§5) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OuterECH:
    """ECHClientHello of type outer."""

    kdf_id: int
    aead_id: int
    config_id: int
    enc: bytes
    payload: bytes


def push_outer_ech(ech: OuterECH) -> bytes:
    w = Writer()
    w.push_uint8(OUTER)
    w.push_uint16(ech.kdf_id)
    w.push_uint16(ech.aead_id)
    w.push_uint8(ech.config_id)
    w.push_vector(2, ech.enc)
    w.push_vector(2, ech.payload)
    return w.data()


def pull_ech(data: bytes) -> OuterECH | None:
    """The client's extension: OuterECH, or None for type inner. Any other type is
    illegal_parameter (§7); a truncated one decode_error."""
    buf = Buffer(data)
    kind = buf.pull_uint8()
    if kind == INNER:
        buf.expect_end()
        return None
    if kind != OUTER:
        raise illegal(f"ECHClientHello type {kind}")
    kdf_id = buf.pull_uint16()
    aead_id = buf.pull_uint16()
    config_id = buf.pull_uint8()
    enc = buf.pull_vector(2)
    payload = buf.pull_vector(2, minimum=1)
    buf.expect_end()
    return OuterECH(kdf_id, aead_id, config_id, enc, payload)


INNER_EXTENSION: RawExtension = (EXT_ENCRYPTED_CLIENT_HELLO, bytes((INNER,)))


# --- confirmation (§7.2, §7.2.1) -----------------------------------------------------------


def _confirmation(params: SuiteParams, inner_random: bytes, label: bytes, th: bytes) -> bytes:
    secret = hkdf_extract(params, bytes(params.hash_len), inner_random)
    return hkdf_expand_label(params, secret, label, th, _CONFIRMATION_LENGTH)


def server_hello_confirmation(
    params: SuiteParams, inner_random: bytes, digest_with: Callable[[bytes], bytes], sh: ServerHello
) -> bytes:
    """§7.2: over ClientHelloInner..ServerHello with the last 8 bytes of its random zeroed.
    `digest_with(message)` hashes the inner transcript so far plus `message`."""
    zeroed = replace(sh, random=sh.random[:24] + bytes(_CONFIRMATION_LENGTH))
    th = digest_with(push_server_hello(zeroed))
    return _confirmation(params, inner_random, b"ech accept confirmation", th)


def retry_request_confirmation(
    params: SuiteParams,
    inner_random: bytes,
    digest_with: Callable[[bytes], bytes],
    hrr: ServerHello,
) -> bytes:
    """§7.2.1: over ClientHelloInner1..HelloRetryRequest, the HRR's ECH payload zeroed."""
    extensions = tuple(
        (t, bytes(_CONFIRMATION_LENGTH) if t == EXT_ENCRYPTED_CLIENT_HELLO else d)
        for t, d in hrr.extensions
    )
    th = digest_with(push_server_hello(replace(hrr, extensions=extensions)))
    return _confirmation(params, inner_random, b"hrr ech accept confirmation", th)


class ECHRejected(TLSError):
    """The server rejected ECH (§6.1.6): the outer handshake authenticated the public
    name, and the connection is aborted with ech_required. `retry_configs` (usable ones,
    possibly none) is what a new connection may offer, once."""

    def __init__(self, retry_configs: bytes | None) -> None:
        super().__init__(AlertDescription.ech_required, "server rejected ECH")
        self.retry_configs = retry_configs
