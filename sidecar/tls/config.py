"""TLSConfig: everything a connection needs, fixed before the first byte."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .groups import DEFAULT_GROUPS, DEFAULT_KEY_SHARES, NamedGroup
from .keylog import KeyLogCallback
from .signatures import (
    DEFAULT_CERTIFICATE_SIGNATURE_SCHEMES,
    DEFAULT_SIGNATURE_SCHEMES,
    PrivateKey,
    SignatureScheme,
    is_rsa_pss_certificate,
    schemes_for_key,
)
from .suites import DEFAULT_CIPHER_SUITES, CipherSuite
from .verify import PeerPolicy, PeerVerifier, SpiffeVerifier

Rng = Callable[[int], bytes]


@dataclass(frozen=True)
class TLSConfig:
    """Configuration shared by any number of connections.

    `rng` is the only source of randomness the engine uses (pass `os.urandom`);
    `trust_bundles` maps a trust domain name to its root certificates; `peer_policy`
    is called with the peer's canonical `ca.SpiffeId` after its chain verified. `verifier` replaces
    the SPIFFE verifier entirely (for tests or non-SPIFFE peers).
    """

    rng: Rng
    certificate_chain: Sequence[x509.Certificate] = ()
    private_key: PrivateKey | None = None
    trust_bundles: Mapping[str, Sequence[x509.Certificate]] = field(default_factory=dict)
    peer_policy: PeerPolicy | None = None
    verifier: PeerVerifier | None = None
    cipher_suites: Sequence[CipherSuite] = DEFAULT_CIPHER_SUITES
    groups: Sequence[NamedGroup] = DEFAULT_GROUPS
    key_share_groups: Sequence[NamedGroup] = DEFAULT_KEY_SHARES
    signature_schemes: Sequence[SignatureScheme] = DEFAULT_SIGNATURE_SCHEMES
    certificate_signature_schemes: Sequence[SignatureScheme] = DEFAULT_CERTIFICATE_SIGNATURE_SCHEMES
    alpn_protocols: Sequence[str] = ()
    require_client_certificate: bool = True
    verify_peer: bool = True
    middlebox_compatibility: bool = True
    send_hrr_cookie: bool = True
    record_padding: int = 0
    key_update_after_records: int | None = None
    key_log: KeyLogCallback | None = None

    def __post_init__(self) -> None:
        if self.certificate_chain and self.private_key is None:
            raise ValueError("certificate_chain given without private_key")
        # Shares only for groups we support; none at all means "always HelloRetryRequest".
        shares = tuple(g for g in self.key_share_groups if g in self.groups)
        object.__setattr__(self, "_key_shares", shares)
        if not self.cipher_suites or not self.groups:
            raise ValueError("at least one cipher suite and one group are required")
        if self.verify_peer and self.verifier is None and not self.trust_bundles:
            raise ValueError("verify_peer needs trust_bundles or a verifier")
        # Derived once per config, not per handshake.
        object.__setattr__(
            self, "_chain_der", tuple(c.public_bytes(Encoding.DER) for c in self.certificate_chain)
        )
        own: tuple[int, ...] = ()
        if self.private_key is not None:
            pss = bool(self.certificate_chain) and is_rsa_pss_certificate(self.certificate_chain[0])
            own = schemes_for_key(self.private_key, pss)
        object.__setattr__(self, "_own_schemes", own)
        verifier: PeerVerifier | None = self.verifier
        if verifier is None and self.trust_bundles:
            verifier = SpiffeVerifier(self.trust_bundles, self.peer_policy)
        object.__setattr__(self, "_peer_verifier", verifier)

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        value: tuple[bytes, ...] = self.__dict__["_chain_der"]
        return value

    @property
    def key_shares(self) -> tuple[NamedGroup, ...]:
        value: tuple[NamedGroup, ...] = self.__dict__["_key_shares"]
        return value

    @property
    def own_signature_schemes(self) -> tuple[int, ...]:
        value: tuple[int, ...] = self.__dict__["_own_schemes"]
        return value

    @property
    def peer_verifier(self) -> PeerVerifier | None:
        value: PeerVerifier | None = self.__dict__["_peer_verifier"]
        return value
