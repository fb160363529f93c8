"""Signature schemes (RFC 8446 §4.2.3) and CertificateVerify (§4.4.3).

ML-DSA (FIPS 204) follows draft-ietf-tls-mldsa: mldsa44/65/87 (0x0904-0x0906) sign the
CertificateVerify content itself, as pure ML-DSA with an empty context string (no
pre-hash, no HashML-DSA), and name the same algorithm when they sign certificates
(the id-ml-dsa-* OIDs of RFC 9881)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, padding, rsa

from .alerts import AlertDescription, TLSError

MLDSAPrivateKey = mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
MLDSAPublicKey = mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey
PrivateKey = (
    ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | MLDSAPrivateKey
)
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey | MLDSAPublicKey


class SignatureScheme(IntEnum):
    rsa_pkcs1_sha256 = 0x0401
    rsa_pkcs1_sha384 = 0x0501
    rsa_pkcs1_sha512 = 0x0601
    ecdsa_secp256r1_sha256 = 0x0403
    ecdsa_secp384r1_sha384 = 0x0503
    ecdsa_secp521r1_sha512 = 0x0603
    rsa_pss_rsae_sha256 = 0x0804
    rsa_pss_rsae_sha384 = 0x0805
    rsa_pss_rsae_sha512 = 0x0806
    ed25519 = 0x0807
    rsa_pss_pss_sha256 = 0x0809
    rsa_pss_pss_sha384 = 0x080A
    rsa_pss_pss_sha512 = 0x080B
    mldsa44 = 0x0904
    mldsa65 = 0x0905
    mldsa87 = 0x0906


MLDSA_SCHEMES: frozenset[int] = frozenset(
    {SignatureScheme.mldsa44, SignatureScheme.mldsa65, SignatureScheme.mldsa87}
)
# FIPS 204 Table 2: signature sizes. A CertificateVerify of another length is refused
# before it reaches the primitive (decrypt_error, as for any bad signature).
MLDSA_SIGNATURE_SIZES: dict[int, int] = {
    SignatureScheme.mldsa44: 2420,
    SignatureScheme.mldsa65: 3309,
    SignatureScheme.mldsa87: 4627,
}

# What we accept in CertificateVerify (TLS 1.3 forbids PKCS#1 v1.5 there, §4.4.3).
DEFAULT_SIGNATURE_SCHEMES: tuple[SignatureScheme, ...] = (
    SignatureScheme.ecdsa_secp256r1_sha256,
    SignatureScheme.ed25519,
    SignatureScheme.ecdsa_secp384r1_sha384,
    SignatureScheme.rsa_pss_rsae_sha256,
    SignatureScheme.rsa_pss_rsae_sha384,
    SignatureScheme.rsa_pss_rsae_sha512,
    SignatureScheme.rsa_pss_pss_sha256,
    SignatureScheme.rsa_pss_pss_sha384,
    SignatureScheme.rsa_pss_pss_sha512,
    # draft-ietf-tls-mldsa: offered, but used only where a key is ML-DSA.
    SignatureScheme.mldsa65,
    SignatureScheme.mldsa44,
    SignatureScheme.mldsa87,
)
# What certificates in a peer's chain may be signed with (signature_algorithms_cert).
DEFAULT_CERTIFICATE_SIGNATURE_SCHEMES: tuple[SignatureScheme, ...] = (
    *DEFAULT_SIGNATURE_SCHEMES,
    SignatureScheme.rsa_pkcs1_sha256,
    SignatureScheme.rsa_pkcs1_sha384,
    SignatureScheme.rsa_pkcs1_sha512,
)

_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    SignatureScheme.rsa_pkcs1_sha256: hashes.SHA256,
    SignatureScheme.rsa_pkcs1_sha384: hashes.SHA384,
    SignatureScheme.rsa_pkcs1_sha512: hashes.SHA512,
    SignatureScheme.ecdsa_secp256r1_sha256: hashes.SHA256,
    SignatureScheme.ecdsa_secp384r1_sha384: hashes.SHA384,
    SignatureScheme.ecdsa_secp521r1_sha512: hashes.SHA512,
    SignatureScheme.rsa_pss_rsae_sha256: hashes.SHA256,
    SignatureScheme.rsa_pss_rsae_sha384: hashes.SHA384,
    SignatureScheme.rsa_pss_rsae_sha512: hashes.SHA512,
    SignatureScheme.rsa_pss_pss_sha256: hashes.SHA256,
    SignatureScheme.rsa_pss_pss_sha384: hashes.SHA384,
    SignatureScheme.rsa_pss_pss_sha512: hashes.SHA512,
}
_RSASSA_PSS_OID = x509.ObjectIdentifier("1.2.840.113549.1.1.10")
_CURVE_SCHEME = {
    "secp256r1": SignatureScheme.ecdsa_secp256r1_sha256,
    "secp384r1": SignatureScheme.ecdsa_secp384r1_sha384,
    "secp521r1": SignatureScheme.ecdsa_secp521r1_sha512,
}

SERVER_CONTEXT = b"TLS 1.3, server CertificateVerify"
CLIENT_CONTEXT = b"TLS 1.3, client CertificateVerify"


def certificate_verify_input(context: bytes, transcript_hash: bytes) -> bytes:
    """RFC 8446 §4.4.3: 64 spaces, the context string, a zero byte, the hash."""
    return b"\x20" * 64 + context + b"\x00" + transcript_hash


_MLDSA_KEY_SCHEME: tuple[tuple[type, int], ...] = (
    (mldsa.MLDSA44PrivateKey, SignatureScheme.mldsa44),
    (mldsa.MLDSA44PublicKey, SignatureScheme.mldsa44),
    (mldsa.MLDSA65PrivateKey, SignatureScheme.mldsa65),
    (mldsa.MLDSA65PublicKey, SignatureScheme.mldsa65),
    (mldsa.MLDSA87PrivateKey, SignatureScheme.mldsa87),
    (mldsa.MLDSA87PublicKey, SignatureScheme.mldsa87),
)


def _mldsa_scheme(key: PrivateKey | PublicKey) -> int | None:
    for key_type, scheme in _MLDSA_KEY_SCHEME:
        if isinstance(key, key_type):
            return scheme
    return None


def schemes_for_key(key: PrivateKey | PublicKey, rsa_pss_key: bool = False) -> tuple[int, ...]:
    """The TLS 1.3 CertificateVerify schemes a key can produce, in our preference."""
    mldsa_scheme = _mldsa_scheme(key)
    if mldsa_scheme is not None:
        # draft-ietf-tls-mldsa-03: one scheme per parameter set, bound to the key.
        return (mldsa_scheme,)
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return (SignatureScheme.ed25519,)
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        scheme = _CURVE_SCHEME.get(key.curve.name)
        return (scheme,) if scheme is not None else ()
    if rsa_pss_key:
        return (
            SignatureScheme.rsa_pss_pss_sha256,
            SignatureScheme.rsa_pss_pss_sha384,
            SignatureScheme.rsa_pss_pss_sha512,
        )
    return (
        SignatureScheme.rsa_pss_rsae_sha256,
        SignatureScheme.rsa_pss_rsae_sha384,
        SignatureScheme.rsa_pss_rsae_sha512,
    )


def is_rsa_pss_certificate(cert: x509.Certificate) -> bool:
    return cert.public_key_algorithm_oid == _RSASSA_PSS_OID


def choose_scheme(candidates: Sequence[int], peer_accepts: Sequence[int]) -> int:
    for scheme in candidates:
        if scheme in peer_accepts:
            return scheme
    # RFC 8446 §4.4.2.2: no acceptable signature algorithm.
    raise TLSError(AlertDescription.handshake_failure, "no common signature scheme")


def _pss(hash_cls: type[hashes.HashAlgorithm]) -> padding.PSS:
    # RFC 8446 §4.2.3: the PSS salt length MUST equal the digest length.
    return padding.PSS(mgf=padding.MGF1(hash_cls()), salt_length=padding.PSS.DIGEST_LENGTH)


def sign(key: PrivateKey, scheme: int, data: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, MLDSAPrivateKey):
        # draft-ietf-tls-mldsa-03: pure ML-DSA over the RFC 8446 §4.4.3 content, empty
        # context string (what Go 1.27 and OpenSSL 4.0 sign and verify too).
        return key.sign(data)
    hash_cls = _HASHES[scheme]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hash_cls()))
    return key.sign(data, _pss(hash_cls), hash_cls())


def verify(
    public_key: PublicKey, scheme: int, signature: bytes, data: bytes, pss_key: bool
) -> None:
    """Verify a CertificateVerify signature; any mismatch is decrypt_error (§4.4.3)."""
    if scheme not in schemes_for_key(public_key, pss_key):
        raise TLSError(AlertDescription.illegal_parameter, "signature scheme does not fit the key")
    if scheme in MLDSA_SCHEMES and len(signature) != MLDSA_SIGNATURE_SIZES[scheme]:
        raise TLSError(AlertDescription.decrypt_error, "ML-DSA signature of the wrong length")
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey | MLDSAPublicKey):
            public_key.verify(signature, data)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(_HASHES[scheme]()))
        else:
            hash_cls = _HASHES[scheme]
            public_key.verify(signature, data, _pss(hash_cls), hash_cls())
    except (InvalidSignature, UnsupportedAlgorithm, ValueError) as exc:
        raise TLSError(AlertDescription.decrypt_error, "bad CertificateVerify signature") from exc


_CERT_SIG_OIDS: dict[tuple[str, str | None], int] = {
    ("1.2.840.10045.4.3.2", None): SignatureScheme.ecdsa_secp256r1_sha256,
    ("1.2.840.10045.4.3.3", None): SignatureScheme.ecdsa_secp384r1_sha384,
    ("1.2.840.10045.4.3.4", None): SignatureScheme.ecdsa_secp521r1_sha512,
    ("1.3.101.112", None): SignatureScheme.ed25519,
    ("1.2.840.113549.1.1.11", None): SignatureScheme.rsa_pkcs1_sha256,
    ("1.2.840.113549.1.1.12", None): SignatureScheme.rsa_pkcs1_sha384,
    ("1.2.840.113549.1.1.13", None): SignatureScheme.rsa_pkcs1_sha512,
    ("1.2.840.113549.1.1.10", "sha256"): SignatureScheme.rsa_pss_rsae_sha256,
    ("1.2.840.113549.1.1.10", "sha384"): SignatureScheme.rsa_pss_rsae_sha384,
    ("1.2.840.113549.1.1.10", "sha512"): SignatureScheme.rsa_pss_rsae_sha512,
    # RFC 9881 §2: id-ml-dsa-44/65/87 (pure ML-DSA, parameters absent).
    ("2.16.840.1.101.3.4.3.17", None): SignatureScheme.mldsa44,
    ("2.16.840.1.101.3.4.3.18", None): SignatureScheme.mldsa65,
    ("2.16.840.1.101.3.4.3.19", None): SignatureScheme.mldsa87,
}


def certificate_signature_scheme(cert: x509.Certificate, issuer_is_pss: bool = False) -> int | None:
    """The TLS scheme a certificate was signed with (for signature_algorithms_cert)."""
    oid = cert.signature_algorithm_oid.dotted_string
    hash_name: str | None = None
    if oid == "1.2.840.113549.1.1.10":
        algorithm = cert.signature_hash_algorithm
        hash_name = algorithm.name if algorithm is not None else None
    scheme = _CERT_SIG_OIDS.get((oid, hash_name))
    if scheme is not None and issuer_is_pss and oid == "1.2.840.113549.1.1.10":
        scheme += SignatureScheme.rsa_pss_pss_sha256 - SignatureScheme.rsa_pss_rsae_sha256
    return scheme
