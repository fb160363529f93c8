"""Signature schemes (RFC 8446 §4.2.3) and CertificateVerify (§4.4.3)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from .alerts import AlertDescription, TLSError

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


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


def schemes_for_key(key: PrivateKey | PublicKey, rsa_pss_key: bool = False) -> tuple[int, ...]:
    """The TLS 1.3 CertificateVerify schemes a key can produce, in our preference."""
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
    try:
        if isinstance(public_key, ed25519.Ed25519PublicKey):
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
