"""Credentials (a certificate chain and its key) and choosing one for a peer.

A server may hold an ECDSA and an ML-DSA SVID at once and serve each client the one it
can verify; a client answering a CertificateRequest picks the same way. The rule, in
`select_credential`, follows RFC 8446 §4.4.2.2: the leaf's key must be able to sign
with a scheme in the peer's `signature_algorithms` (else the handshake cannot go on),
and the chain's own signatures should be within `signature_algorithms_cert` (which
defaults to `signature_algorithms` when absent, §4.2.3). When no chain meets the second
rule the first whose key fits is sent anyway: the RFC says to continue with a chain of
the sender's choice and let the peer decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .alerts import AlertDescription, TLSError
from .signatures import (
    PrivateKey,
    certificate_signature_scheme,
    is_rsa_pss_certificate,
    schemes_for_key,
)

__all__ = ["Credential", "require_credential", "select_credential"]


@dataclass(frozen=True)
class Credential:
    """A chain (leaf first, then intermediates) and the leaf's private key.

    `signature_schemes` are the CertificateVerify schemes the key can produce;
    `chain_schemes` the schemes the chain's certificates are signed with (None for an
    algorithm TLS has no code point for), both derived once here."""

    chain: Sequence[x509.Certificate]
    private_key: PrivateKey
    chain_der: tuple[bytes, ...] = field(init=False)
    signature_schemes: tuple[int, ...] = field(init=False)
    chain_schemes: tuple[int | None, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.chain:
            raise ValueError("a credential needs at least its leaf certificate")
        chain = tuple(self.chain)
        object.__setattr__(self, "chain", chain)
        object.__setattr__(self, "chain_der", tuple(c.public_bytes(Encoding.DER) for c in chain))
        pss = is_rsa_pss_certificate(chain[0])
        object.__setattr__(self, "signature_schemes", schemes_for_key(self.private_key, pss))
        schemes: list[int | None] = []
        for index, cert in enumerate(chain):
            if cert.issuer == cert.subject and index > 0:
                continue  # RFC 8446 §4.2.3: a self-signed trust anchor is not checked
            issuer_pss = index + 1 < len(chain) and is_rsa_pss_certificate(chain[index + 1])
            schemes.append(certificate_signature_scheme(cert, issuer_pss))
        object.__setattr__(self, "chain_schemes", tuple(schemes))


def _first_common(candidates: Sequence[int], peer_accepts: Sequence[int]) -> int | None:
    return next((scheme for scheme in candidates if scheme in peer_accepts), None)


def select_credential(
    credentials: Sequence[Credential],
    peer_schemes: Sequence[int],
    peer_cert_schemes: Sequence[int] | None,
) -> tuple[Credential, int] | None:
    """The first credential the peer can verify and the scheme to sign with, or None
    when no credential's key can sign with any scheme the peer offered."""
    usable = [
        (credential, scheme)
        for credential in credentials
        if (scheme := _first_common(credential.signature_schemes, peer_schemes)) is not None
    ]
    if not usable:
        return None
    cert_schemes = peer_cert_schemes if peer_cert_schemes is not None else peer_schemes
    for credential, scheme in usable:
        if all(s is not None and s in cert_schemes for s in credential.chain_schemes):
            return credential, scheme
    return usable[0]


def require_credential(
    credentials: Sequence[Credential],
    peer_schemes: Sequence[int],
    peer_cert_schemes: Sequence[int] | None,
) -> tuple[Credential, int]:
    """`select_credential` for a server, which cannot go on without one."""
    chosen = select_credential(credentials, peer_schemes, peer_cert_schemes)
    if chosen is None:
        # RFC 8446 §4.4.2.2 / §4.4.3: no certificate whose key signs with an offered scheme.
        raise TLSError(AlertDescription.handshake_failure, "no certificate fits the peer's schemes")
    return chosen
