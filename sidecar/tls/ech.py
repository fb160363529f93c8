"""Encrypted ClientHello (RFC 9849): configs, sealing, opening and confirmation.

The client sends a ClientHelloOuter naming only the public name, with the real
ClientHelloInner sealed under the server's HPKE key in `encrypted_client_hello`; the
outer hello is the AAD (§5.2). The server (shared mode, §7.1) trial-decrypts with its
current and previous keys; it accepts by writing 8 bytes of `accept_confirmation` into
ServerHello.random (§7.2), or rejects and completes the outer handshake with the public
name's certificate and `retry_configs` (§7.1).

This module holds the wire formats and the cryptographic steps; `client.py` and
`server.py` call them at the points the handshake reaches them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from .alerts import AlertDescription, TLSError
from .codec import Buffer, Writer
from .extensions import RawExtension, pull_extensions, push_extensions
from .hpke import AeadId, Context, HpkeError, KdfId, KemId, setup_base_r, setup_base_s
from .keyschedule import Transcript, hkdf_expand_label, hkdf_extract
from .messages import (
    ClientHello,
    ServerHello,
    message_hash,
    push_client_hello,
    push_server_hello,
)
from .signatures import PublicKey, is_rsa_pss_certificate
from .suites import SuiteParams
from .verify import VerifiedPeer

ECH_VERSION = 0xFE0D
EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D
EXT_ECH_OUTER_EXTENSIONS = 0xFD00
OUTER, INNER = 0, 1
_TAG_LENGTH = 16  # Nt of every AEAD in hpke.AeadId
_CONFIRMATION_LENGTH = 8

_SUPPORTED_SUITES = frozenset((KdfId.HKDF_SHA256, int(a)) for a in AeadId)


def _illegal(reason: str) -> TLSError:
    return TLSError(AlertDescription.illegal_parameter, reason)


def _decode(reason: str) -> TLSError:
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
            and any(s in _SUPPORTED_SUITES for s in self.cipher_suites)
            and not any(t & 0x8000 for t, _ in self.extensions)
            and valid_public_name(self.public_name)
        )

    def suite(self) -> tuple[int, int]:
        return next(s for s in self.cipher_suites if s in _SUPPORTED_SUITES)


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
            raise _decode("bad HpkeSymmetricCipherSuite list")
        while not buf.eof():
            suites.append((buf.pull_uint16(), buf.pull_uint16()))
    maximum_name_length = buf.pull_uint8()
    name = buf.pull_vector(1, minimum=1)
    extensions = pull_extensions(buf)
    buf.expect_end()
    try:
        public_name = name.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _decode("public_name is not ASCII") from exc
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
            raise _decode("empty ECHConfigList")
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
        raise _illegal(f"ECHClientHello type {kind}")
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


# --- the client: sealing (§6.1) ----------------------------------------------------------

# Extensions copied from the outer hello by reference (§5.1): the bulky, non-secret ones.
_COMPRESSIBLE = (10, 51, 13, 50)  # supported_groups, key_share, signature_algorithms(_cert)
# What the outer hello carries in clear besides these (§6.1.2 keeps it unremarkable).
_OUTER_ONLY_COPIED = (43, 45, 44)  # supported_versions, psk_key_exchange_modes, cookie


def _padding(inner_length: int, server_name: str | None, maximum_name_length: int) -> int:
    """§6.1.3: pad the name to maximum_name_length, then the whole to a multiple of 32."""
    if server_name is not None:
        padding = max(0, maximum_name_length - len(server_name))
    else:
        padding = maximum_name_length + 9
    length = inner_length + padding
    return padding + 31 - ((length - 1) % 32)


@dataclass(slots=True)
class ClientECH:
    """What a client that offered ECH keeps until ServerHello says accepted or not."""

    config: ECHConfig
    context: Context
    kdf_id: int
    aead_id: int


def _encode_inner(inner: ClientHello, outer_types: Sequence[int]) -> bytes:
    """EncodedClientHelloInner (§5.1) without padding: empty legacy_session_id, and
    the extensions also in the outer hello replaced by one ech_outer_extensions."""
    extensions: list[RawExtension] = []
    referenced: list[int] = []
    for ext_type, data in inner.extensions:
        if ext_type in _COMPRESSIBLE and ext_type in outer_types:
            if not referenced:
                extensions.append((EXT_ECH_OUTER_EXTENSIONS, b""))
            referenced.append(ext_type)
            continue
        extensions.append((ext_type, data))
    if referenced:
        body = bytes((2 * len(referenced),)) + b"".join(t.to_bytes(2, "big") for t in referenced)
        extensions = [(t, body if t == EXT_ECH_OUTER_EXTENSIONS else d) for t, d in extensions]
    return push_client_hello(replace(inner, legacy_session_id=b"", extensions=tuple(extensions)))[
        4:
    ]


def outer_extensions(inner: ClientHello, public_name: str) -> list[RawExtension]:
    """The outer hello's extensions: the public name, then those shared with the inner
    hello in the inner hello's order (so ech_outer_extensions references them in order)."""
    from .extensions import ExtensionType, push_server_name

    result: list[RawExtension] = [(ExtensionType.server_name, push_server_name(public_name))]
    for ext_type, data in inner.extensions:
        if ext_type in _COMPRESSIBLE or ext_type in _OUTER_ONLY_COPIED:
            result.append((ext_type, data))
    return result


def seal_client_hello(
    inner: ClientHello,
    outer: ClientHello,
    server_name: str | None,
    ech: ClientECH,
    enc: bytes,
) -> ClientHello:
    """The outer hello with `encrypted_client_hello` holding `inner`, sealed with the
    next sequence number of `ech.context` (0, then 1 after a HelloRetryRequest)."""
    encoded = _encode_inner(inner, [t for t, _ in outer.extensions])
    encoded += bytes(_padding(len(encoded), server_name, ech.config.maximum_name_length))
    placeholder = OuterECH(
        ech.kdf_id, ech.aead_id, ech.config.config_id, enc, bytes(len(encoded) + _TAG_LENGTH)
    )
    with_zeros = replace(
        outer,
        extensions=(*outer.extensions, (EXT_ENCRYPTED_CLIENT_HELLO, push_outer_ech(placeholder))),
    )
    # §5.2: the AAD is ClientHelloOuter (no handshake header) with the payload zeroed.
    aad = push_client_hello(with_zeros)[4:]
    payload = ech.context.seal(aad, encoded)
    sealed = replace(placeholder, payload=payload)
    return replace(
        outer,
        extensions=(*outer.extensions, (EXT_ENCRYPTED_CLIENT_HELLO, push_outer_ech(sealed))),
    )


def start_client_ech(config: ECHConfig, rng: Callable[[int], bytes]) -> tuple[ClientECH, bytes]:
    kdf_id, aead_id = config.suite()
    enc, context = setup_base_s(config.public_key, config.info, aead_id, rng)
    return ClientECH(config, context, kdf_id, aead_id), enc


def grease_extension(rng: Callable[[int], bytes], payload_length: int = 176) -> bytes:
    """§6.2: an outer extension indistinguishable from a real one: random config_id,
    a real suite, a real X25519 public key, a random payload of a plausible length."""
    enc = X25519PrivateKey.from_private_bytes(rng(32)).public_key().public_bytes_raw()
    return push_outer_ech(
        OuterECH(KdfId.HKDF_SHA256, AeadId.AES_128_GCM, rng(1)[0], enc, rng(payload_length))
    )


def regrease(data: bytes, rng: Callable[[int], bytes]) -> bytes:
    """§6.2: the GREASE extension of a second ClientHello keeps its suite and config_id,
    an empty enc (as a real one would) and a fresh payload of the same length."""
    ech = pull_ech(data)
    assert ech is not None
    return push_outer_ech(replace(ech, enc=b"", payload=rng(len(ech.payload))))


@dataclass(frozen=True, slots=True)
class ClientOfferECH:
    """A client's real ECH offer, kept until ServerHello: the sealing context, the
    outer hello last sent and its own transcript (the one used if ECH is rejected)."""

    ech: ClientECH
    outer: ClientHello
    outer_transcript: Transcript
    accepted_by_retry: bool | None = None  # a HelloRetryRequest's confirmation matched

    @property
    def public_name(self) -> str:
        return self.ech.config.public_name


def offer_client_ech(
    config: ECHConfig,
    inner: ClientHello,
    server_name: str | None,
    rng: Callable[[int], bytes],
) -> tuple[ClientHello, ClientOfferECH]:
    """The first ClientHelloOuter for `inner` (which carries INNER_EXTENSION), §6.1."""
    ech, enc = start_client_ech(config, rng)
    outer = ClientHello(
        rng(32),
        inner.legacy_session_id,
        inner.cipher_suites,
        b"\x00",
        tuple(outer_extensions(inner, config.public_name)),
    )
    sealed = seal_client_hello(inner, outer, server_name, ech, enc)
    transcript = Transcript()
    return sealed, ClientOfferECH(ech, sealed, transcript)


def retry_client_ech(
    offer: ClientOfferECH,
    params: SuiteParams,
    inner1: ClientHello,
    inner2: ClientHello,
    hrr: ServerHello,
    hrr_raw: bytes,
    server_name: str | None,
) -> tuple[ClientHello, ClientOfferECH]:
    """§6.1.5: after a HelloRetryRequest, the second outer hello seals `inner2` with
    sequence number 1 and an empty enc; the HRR confirmation (§7.2.1) is checked over
    message_hash(ClientHelloInner1) and the HelloRetryRequest."""
    inner1_hash = message_hash(params.hash_name, push_client_hello(inner1))

    def inner_digest_with(message: bytes) -> bytes:
        return hashlib.new(params.hash_name, inner1_hash + message).digest()

    confirmation = next((d for t, d in hrr.extensions if t == EXT_ENCRYPTED_CLIENT_HELLO), None)
    accepted = confirmation is not None and hmac.compare_digest(
        confirmation,
        retry_request_confirmation(params, inner1.random, inner_digest_with, hrr),
    )
    outer1 = offer.outer
    outer2 = replace(outer1, extensions=tuple(outer_extensions(inner2, offer.public_name)))
    sealed = seal_client_hello(inner2, outer2, server_name, offer.ech, b"")
    transcript = offer.outer_transcript
    transcript.restart_after_retry(params.hash_name, push_client_hello(outer1))
    transcript.update(hrr_raw)
    return sealed, replace(offer, outer=sealed, accepted_by_retry=accepted)


def client_ech_accepted(
    offer: ClientOfferECH,
    params: SuiteParams,
    inner: ClientHello,
    inner_transcript: Transcript,
    sh: ServerHello,
) -> bool:
    """§6.1.4: ServerHello.random ends in the accept confirmation, or ECH was rejected.
    After a HelloRetryRequest the two confirmations must agree (§6.1.5)."""
    confirmation = server_hello_confirmation(
        params,
        inner.random,
        lambda m: inner_transcript.digest_with(params.hash_name, m),
        sh,
    )
    accepted = hmac.compare_digest(sh.random[24:], confirmation)
    if offer.accepted_by_retry is not None and accepted != offer.accepted_by_retry:
        raise _illegal("ServerHello and HelloRetryRequest disagree on ECH")
    return accepted


# --- the server: opening (§7.1) ----------------------------------------------------------


def _pull_encoded_inner(data: bytes) -> tuple[ClientHello, bytes]:
    """EncodedClientHelloInner: the ClientHello body, then the padding."""
    buf = Buffer(data)
    legacy_version = buf.pull_uint16()
    random = buf.pull_bytes(32)
    session_id = buf.pull_vector(1, maximum=32)
    suites_raw = buf.pull_vector(2, minimum=2)
    if len(suites_raw) % 2:
        raise _decode("odd cipher_suites length")
    suites = tuple(
        int.from_bytes(suites_raw[i : i + 2], "big") for i in range(0, len(suites_raw), 2)
    )
    compression = buf.pull_vector(1, minimum=1)
    extensions = pull_extensions(buf)
    padding = buf.pull_rest()
    hello = ClientHello(random, session_id, suites, compression, extensions, legacy_version)
    return hello, padding


def decode_inner(encoded: bytes, outer: ClientHello) -> ClientHello:
    """ClientHelloInner from EncodedClientHelloInner and the outer hello (§5.1), with
    the checks §7.1 makes illegal_parameter: non-zero padding, a session id of its own,
    ech_outer_extensions referring to encrypted_client_hello, to a missing extension or
    out of order, and no inner-type encrypted_client_hello."""
    hello, padding = _pull_encoded_inner(encoded)
    if padding.strip(b"\x00"):
        raise _illegal("non-zero padding in EncodedClientHelloInner")
    if hello.legacy_session_id:
        raise _illegal("EncodedClientHelloInner with a legacy_session_id")
    outer_ext = list(outer.extensions)
    cursor = 0
    extensions: list[RawExtension] = []
    seen_outer_extensions = False
    for ext_type, data in hello.extensions:
        if ext_type != EXT_ECH_OUTER_EXTENSIONS:
            extensions.append((ext_type, data))
            continue
        if seen_outer_extensions:
            raise _illegal("two ech_outer_extensions")
        seen_outer_extensions = True
        buf = Buffer(data)
        raw_types = buf.pull_vector(1, minimum=2, maximum=254)
        buf.expect_end()
        if len(raw_types) % 2:
            raise _decode("odd OuterExtensions length")
        for i in range(0, len(raw_types), 2):
            wanted = int.from_bytes(raw_types[i : i + 2], "big")
            if wanted == EXT_ENCRYPTED_CLIENT_HELLO:
                raise _illegal("ech_outer_extensions refers to encrypted_client_hello")
            # §5.1: referenced in order; searching forward from the last one found.
            while cursor < len(outer_ext) and outer_ext[cursor][0] != wanted:
                cursor += 1
            if cursor == len(outer_ext):
                raise _illegal(f"ech_outer_extensions refers to missing extension {wanted}")
            extensions.append(outer_ext[cursor])
            cursor += 1
    types = [t for t, _ in extensions]
    if len(set(types)) != len(types):
        raise _illegal("duplicate extension in ClientHelloInner")
    if INNER_EXTENSION not in extensions:
        raise _illegal("ClientHelloInner without an inner encrypted_client_hello")
    versions = next((d for t, d in extensions if t == 43), None)
    if versions is not None:
        offered = [int.from_bytes(versions[i : i + 2], "big") for i in range(1, len(versions), 2)]
        if any(v < 0x0304 for v in offered):
            # §7.1: ClientHelloInner offers TLS 1.3 and later only.
            raise _illegal("ClientHelloInner offers a version before TLS 1.3")
    return replace(hello, legacy_session_id=outer.legacy_session_id, extensions=tuple(extensions))


@dataclass(slots=True)
class ServerECH:
    """An accepted offer: the context (for the second ClientHello) and what it used."""

    context: Context
    config_id: int
    kdf_id: int
    aead_id: int


def _aad(outer: ClientHello, ech: OuterECH) -> bytes:
    zeroed = push_outer_ech(replace(ech, payload=bytes(len(ech.payload))))
    extensions = tuple(
        (t, zeroed if t == EXT_ENCRYPTED_CLIENT_HELLO else d) for t, d in outer.extensions
    )
    return push_client_hello(replace(outer, extensions=extensions))[4:]


def open_client_hello(
    outer: ClientHello, ech: OuterECH, keys: Sequence[ECHKey]
) -> tuple[ClientHello, ServerECH] | None:
    """Trial decryption with every key whose config_id and suite match (§7.1): the
    ClientHelloInner and its context, or None (reject: go on with the outer hello)."""
    aad = _aad(outer, ech)
    for key in keys:
        config = key.config
        if config.config_id != ech.config_id:
            continue
        if (ech.kdf_id, ech.aead_id) not in config.cipher_suites:
            continue
        if (ech.kdf_id, ech.aead_id) not in _SUPPORTED_SUITES:
            continue
        try:
            context = setup_base_r(ech.enc, key.private_key, config.info, ech.aead_id)
            encoded = context.open(aad, ech.payload)
        except HpkeError:
            continue
        inner = decode_inner(encoded, outer)
        return inner, ServerECH(context, ech.config_id, ech.kdf_id, ech.aead_id)
    return None


def open_second_client_hello(outer: ClientHello, ech: OuterECH, accepted: ServerECH) -> ClientHello:
    """§7.1.1: the second ClientHello of an accepted offer: same config and suite, an
    empty enc, sealed with the next sequence number; anything else is fatal."""
    if (ech.config_id, ech.kdf_id, ech.aead_id) != (
        accepted.config_id,
        accepted.kdf_id,
        accepted.aead_id,
    ) or ech.enc:
        raise _illegal("second ClientHello changed its ECH config, suite or enc")
    try:
        encoded = accepted.context.open(_aad(outer, ech), ech.payload)
    except HpkeError as exc:
        raise TLSError(AlertDescription.decrypt_error, "second ClientHelloInner") from exc
    return decode_inner(encoded, outer)


@dataclass(frozen=True, slots=True)
class ServerOutcome:
    """What the server made of a ClientHello's ECH: `accepted` (the inner hello is
    used, with this context) or rejected (the outer one, retry_configs sent)."""

    accepted: ServerECH | None

    @property
    def label(self) -> str:
        return "accepted" if self.accepted is not None else "rejected"


def server_receive_ech(
    keys: Sequence[ECHKey], outer: ClientHello, previous: ServerOutcome | None, second: bool
) -> tuple[ClientHello, ServerOutcome | None]:
    """The ClientHello the handshake goes on with, and the ECH outcome (None: no ECH
    offered, or no keys to open one). `second`: this answers a HelloRetryRequest."""
    if not keys:
        return outer, None
    data = next((d for t, d in outer.extensions if t == EXT_ENCRYPTED_CLIENT_HELLO), None)
    if second:
        if previous is None or previous.accepted is None:
            return outer, previous
        if data is None:
            raise TLSError(AlertDescription.missing_extension, "second ClientHello dropped ECH")
        ech = pull_ech(data)
        if ech is None:
            raise _illegal("second ClientHelloOuter of type inner")
        return open_second_client_hello(outer, ech, previous.accepted), previous
    if data is None:
        return outer, None
    ech = pull_ech(data)
    if ech is None:
        # Type inner on the wire: what a split-mode backend gets (§7.2); in shared mode
        # there is nothing to decrypt, so the hello is taken as it is.
        return outer, None
    opened = open_client_hello(outer, ech, keys)
    if opened is None:
        return outer, ServerOutcome(None)
    inner, state = opened
    return inner, ServerOutcome(state)


# --- the client, rejected: the outer handshake authenticates the public name (§6.1.7) --


class PublicNameVerifier:
    """Verifies the server's chain as a WebPKI server certificate for `public_name`
    against `roots`: what authenticates a rejection's `retry_configs`."""

    def __init__(self, public_name: str, roots: Sequence[x509.Certificate]) -> None:
        self._name = public_name
        self._store = Store(list(roots)) if roots else None

    def verify(
        self,
        chain: Sequence[bytes],
        now: dt.datetime,
        peer_is_server: bool,
        accepted_cert_schemes: Sequence[int],
    ) -> VerifiedPeer:
        if self._store is None:
            raise TLSError(AlertDescription.unknown_ca, "no roots for the ECH public name")
        try:
            certs = [x509.load_der_x509_certificate(der) for der in chain]
        except ValueError as exc:
            raise TLSError(AlertDescription.bad_certificate, "unparseable certificate") from exc
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(now.replace(microsecond=0))
            .build_server_verifier(x509.DNSName(self._name))
        )
        try:
            verifier.verify(certs[0], certs[1:])
        except VerificationError as exc:
            raise TLSError(AlertDescription.bad_certificate, f"public name: {exc}") from exc
        key = certs[0].public_key()
        if not isinstance(key, PublicKey):
            raise TLSError(AlertDescription.unsupported_certificate, "unsupported leaf key type")
        return VerifiedPeer(None, tuple(certs), key, is_rsa_pss_certificate(certs[0]))


class ECHRejected(TLSError):
    """The server rejected ECH (§6.1.6): the outer handshake authenticated the public
    name, and the connection is aborted with ech_required. `retry_configs` (usable ones,
    possibly none) is what a new connection may offer, once."""

    def __init__(self, retry_configs: bytes | None) -> None:
        super().__init__(AlertDescription.ech_required, "server rejected ECH")
        self.retry_configs = retry_configs
