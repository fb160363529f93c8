"""``build_csr``: the PKCS#10 request an agent sends for every SVID it asks the CA for."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ca.keys import PrivateKey
from ca.spiffeid import SpiffeId

__all__ = ["build_csr"]


def build_csr(key: PrivateKey, spiffe_id: SpiffeId | str | None = None) -> bytes:
    """A DER PKCS#10 CSR for ``key``; with ``spiffe_id`` it carries that URI SAN."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Trellis")])
    )
    if spiffe_id is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
    algorithm: hashes.HashAlgorithm | None = None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
    elif isinstance(key, rsa.RSAPrivateKey):
        algorithm = hashes.SHA256()
    csr = builder.sign(key, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.DER)
