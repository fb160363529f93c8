"""The client's side of Encrypted ClientHello (RFC 9849 §6): sealing the inner hello
into the outer one, resealing it after a HelloRetryRequest, reading the confirmations,
GREASE (§6.2), and verifying a rejection's outer handshake as the public name (§6.1.7).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from .alerts import AlertDescription, TLSError
from .ech import (
    EXT_ECH_OUTER_EXTENSIONS,
    EXT_ENCRYPTED_CLIENT_HELLO,
    TAG_LENGTH,
    ECHConfig,
    OuterECH,
    illegal,
    push_outer_ech,
    retry_request_confirmation,
    server_hello_confirmation,
)
from .extensions import (
    ExtensionType,
    RawExtension,
    pull_offered_psks,
    push_offered_psks,
    push_server_name,
)
from .hpke import AeadId, Context, KdfId, setup_base_s
from .keyschedule import Transcript
from .messages import (
    ClientHello,
    ServerHello,
    message_hash,
    push_client_hello,
)
from .signatures import PublicKey, is_rsa_pss_certificate
from .suites import SuiteParams
from .verify import VerifiedPeer

# Extensions copied from the outer hello by reference (§5.1): the bulky, non-secret ones.
_COMPRESSIBLE = (
    ExtensionType.supported_groups,
    ExtensionType.key_share,
    ExtensionType.signature_algorithms,
    ExtensionType.signature_algorithms_cert,
)
# What the outer hello also carries, in clear and in full (§6.1.2: an unremarkable
# hello). The cookie and early_data go to both hellos: a server that rejects ECH reads
# the outer one.
_OUTER_ONLY_COPIED = (
    ExtensionType.supported_versions,
    ExtensionType.psk_key_exchange_modes,
    ExtensionType.cookie,
    ExtensionType.early_data,
)


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
        ech.kdf_id, ech.aead_id, ech.config.config_id, enc, bytes(len(encoded) + TAG_LENGTH)
    )
    # RFC 8446 §4.2.11: pre_shared_key stays last, so the ECH extension goes before it.
    head = tuple(e for e in outer.extensions if e[0] != ExtensionType.pre_shared_key)
    tail = tuple(e for e in outer.extensions if e[0] == ExtensionType.pre_shared_key)
    with_zeros = replace(
        outer,
        extensions=(*head, (EXT_ENCRYPTED_CLIENT_HELLO, push_outer_ech(placeholder)), *tail),
    )
    # §5.2: the AAD is ClientHelloOuter (no handshake header) with the payload zeroed.
    aad = push_client_hello(with_zeros)[4:]
    payload = ech.context.seal(aad, encoded)
    sealed = replace(placeholder, payload=payload)
    return replace(
        outer, extensions=(*head, (EXT_ENCRYPTED_CLIENT_HELLO, push_outer_ech(sealed)), *tail)
    )


def _with_grease_psk(
    extensions: list[RawExtension],
    inner: ClientHello,
    rng: Callable[[int], bytes],
    previous: bytes | None,
) -> tuple[RawExtension, ...]:
    """RFC 9849 §6.1.2, §10.12.3: an inner hello offering a ticket gets a GREASE
    pre_shared_key in the outer one (random identities, ages and binders of the same
    lengths), so the outer hello does not say whether the client resumes. After a
    HelloRetryRequest the identities stay and the binders are drawn anew."""
    data = next((d for t, d in inner.extensions if t == ExtensionType.pre_shared_key), None)
    if data is None:
        return tuple(extensions)
    offered = pull_offered_psks(data)
    if previous is not None:
        identities = pull_offered_psks(previous).identities
    else:
        identities = tuple(
            (rng(len(identity)), int.from_bytes(rng(4), "big"))
            for identity, _ in offered.identities
        )
    binders = [rng(len(binder)) for binder in offered.binders]
    grease = (ExtensionType.pre_shared_key, push_offered_psks(identities, binders))
    return (*extensions, grease)


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
    extensions = _with_grease_psk(outer_extensions(inner, config.public_name), inner, rng, None)
    outer = ClientHello(rng(32), inner.legacy_session_id, inner.cipher_suites, b"\x00", extensions)
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
    rng: Callable[[int], bytes],
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
    previous = next((d for t, d in outer1.extensions if t == ExtensionType.pre_shared_key), None)
    extensions = outer_extensions(inner2, offer.public_name)
    outer2 = replace(outer1, extensions=_with_grease_psk(extensions, inner2, rng, previous))
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
        raise illegal("ServerHello and HelloRetryRequest disagree on ECH")
    return accepted


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
