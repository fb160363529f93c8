"""X509-SVIDs: building leaves to the SPIFFE X509-SVID standard, and checking them.

The rules are those of the X509-SVID standard §4-5 plus Trellis's own issuance profile.
``check_leaf`` and ``check_signing_certificate`` raise ``SvidError`` whose
``rule`` names the broken rule, the same names the negative fixtures in the tests carry.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from ca.keys import PrivateKey, is_mldsa
from ca.spiffeid import SpiffeId, SpiffeIdError

__all__ = [
    "CLOCK_SKEW",
    "DEFAULT_X509_SVID_TTL",
    "LEAF_KEY_USAGE",
    "MAX_X509_SVID_TTL",
    "SIGNING_KEY_USAGE",
    "SvidError",
    "X509Svid",
    "check_leaf",
    "check_signing_certificate",
    "load_der_chain",
    "spiffe_id_of",
]

DEFAULT_X509_SVID_TTL = dt.timedelta(hours=1)
MAX_X509_SVID_TTL = dt.timedelta(hours=24)
# notBefore is backdated so a peer whose clock is slightly behind still accepts the SVID.
CLOCK_SKEW = dt.timedelta(seconds=30)


class SvidError(ValueError):
    """An SVID (or a certificate in its chain) breaks a SPIFFE rule."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule = rule
        super().__init__(f"{detail} [{rule}]")


@dataclass(frozen=True, slots=True)
class X509Svid:
    """An issued X509-SVID: the leaf, the chain up to (excluding) the root, maybe the key."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def expires_at(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def chain_der(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in self.chain)


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except ValueError as exc:  # duplicate or undecodable extensions
        raise SvidError("malformed-extension", f"cannot parse extensions: {exc}") from exc
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The single SPIFFE ID in a leaf's URI SAN (X509-SVID §2)."""
    uris = _uri_sans(cert)
    if not uris:
        raise SvidError("no-uri-san", "certificate has no URI SAN")
    if len(uris) > 1:
        raise SvidError(
            "two-uri-sans", f"certificate has {len(uris)} URI SANs; exactly one is allowed"
        )
    try:
        return SpiffeId(uris[0])
    except SpiffeIdError as exc:
        raise SvidError(
            "uri-san-not-spiffe-id", f"URI SAN is not a valid SPIFFE ID: {exc}"
        ) from exc


def load_der_chain(data: bytes) -> list[x509.Certificate]:
    """Certificates from concatenated DER: how the Workload API carries chains and bundles.

    Raises ``ValueError`` when the bytes are not a sequence of whole DER certificates.
    """
    certs = []
    offset = 0
    while offset < len(data):
        # A DER SEQUENCE: 0x30, then a short-form length or 0x80|n and n length bytes.
        if data[offset] != 0x30 or offset + 2 > len(data):
            raise ValueError("not a DER certificate sequence")
        first = data[offset + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            count = first & 0x7F
            if not 0 < count <= 4:
                raise ValueError("unsupported DER length encoding")
            header = 2 + count
            length = int.from_bytes(data[offset + 2 : offset + header], "big")
        end = offset + header + length
        if end > len(data):
            raise ValueError("truncated DER certificate")
        certs.append(x509.load_der_x509_certificate(data[offset:end]))
        offset = end
    return certs


def _extension(
    cert: x509.Certificate, oid: x509.ObjectIdentifier
) -> x509.Extension[x509.ExtensionType] | None:
    try:
        return cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # duplicate or malformed extensions
        raise SvidError("malformed-extension", f"cannot parse extensions: {exc}") from exc


def check_leaf(cert: x509.Certificate) -> SpiffeId:
    """Check a leaf against X509-SVID §4 and §5.2; return its SPIFFE ID."""
    spiffe_id = spiffe_id_of(cert)
    if not spiffe_id.path:
        raise SvidError("leaf-without-path", "a leaf SVID's SPIFFE ID must have a path")
    bc = _extension(cert, ExtensionOID.BASIC_CONSTRAINTS)
    if bc is not None and isinstance(bc.value, x509.BasicConstraints) and bc.value.ca:
        raise SvidError("leaf-ca-true", "leaf has basicConstraints cA=true")
    ku = _extension(cert, ExtensionOID.KEY_USAGE)
    if ku is None or not isinstance(ku.value, x509.KeyUsage):
        raise SvidError("missing-key-usage", "leaf has no Key Usage extension")
    if not ku.critical:
        raise SvidError("key-usage-not-critical", "leaf Key Usage must be critical")
    if ku.value.key_cert_sign:
        raise SvidError("key-cert-sign-on-leaf", "leaf Key Usage must not include keyCertSign")
    if ku.value.crl_sign:
        raise SvidError("crl-sign-on-leaf", "leaf Key Usage must not include cRLSign")
    if not ku.value.digital_signature:
        raise SvidError("no-digital-signature", "leaf Key Usage must include digitalSignature")
    if is_mldsa(_public_key(cert)) and (
        ku.value.key_encipherment or ku.value.data_encipherment or ku.value.key_agreement
    ):
        # RFC 9881 §5: an ML-DSA key signs only; a usage that encrypts or agrees keys with
        # it is a certificate no conforming CA issues.
        raise SvidError(
            "mldsa-key-encipherment",
            "an ML-DSA leaf's Key Usage must not include keyEncipherment, dataEncipherment"
            " or keyAgreement",
        )
    eku = _extension(cert, ExtensionOID.EXTENDED_KEY_USAGE)
    if eku is not None and isinstance(eku.value, x509.ExtendedKeyUsage):
        usages = set(eku.value)
        if (
            ExtendedKeyUsageOID.SERVER_AUTH not in usages
            and ExtendedKeyUsageOID.CLIENT_AUTH not in usages
        ):
            raise SvidError(
                "wrong-eku", "leaf Extended Key Usage has neither serverAuth nor clientAuth"
            )
    return spiffe_id


def _public_key(cert: x509.Certificate) -> object:
    try:
        return cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None  # a key the leaf's verifier refuses on its own


def check_signing_certificate(cert: x509.Certificate) -> None:
    """X509-SVID §4.1/§4.3: a signing certificate has cA=true and keyCertSign."""
    bc = _extension(cert, ExtensionOID.BASIC_CONSTRAINTS)
    if bc is None or not isinstance(bc.value, x509.BasicConstraints) or not bc.value.ca:
        raise SvidError(
            "signing-cert-ca-false", "signing certificate lacks basicConstraints cA=true"
        )
    ku = _extension(cert, ExtensionOID.KEY_USAGE)
    if ku is None or not isinstance(ku.value, x509.KeyUsage) or not ku.value.key_cert_sign:
        raise SvidError(
            "signing-cert-without-key-cert-sign", "signing certificate lacks keyCertSign"
        )


def leaf_extensions(
    spiffe_id: SpiffeId,
    subject_key_identifier: x509.SubjectKeyIdentifier,
    authority_key_identifier: x509.AuthorityKeyIdentifier,
    dns_names: Sequence[str] = (),
) -> list[tuple[x509.ExtensionType, bool]]:
    """The extensions of every Trellis leaf, in order, with their criticality."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names.extend(x509.DNSName(n) for n in dns_names)
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (LEAF_KEY_USAGE, True),
        (_LEAF_EKU, False),
        (x509.SubjectAlternativeName(names), False),
        (subject_key_identifier, False),
        (authority_key_identifier, False),
    ]


# X509-SVID §4.3: a leaf signs handshakes only; a signing certificate signs certificates and CRLs.
LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
SIGNING_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
