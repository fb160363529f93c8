"""Issuance from PKCS#10 CSRs: the signature is checked, the requested ID must match."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ca import IntermediateAuthority, IssuanceError, SpiffeId, check_leaf, load_csr
from ca.authority import MAX_CSR_BYTES

WEB = "spiffe://example.org/ns/default/sa/web"


def make_csr(
    uris: tuple[str, ...] = (), key: object | None = None
) -> x509.CertificateSigningRequest:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


def pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def test_csr_without_san_is_signed_for_the_requested_id(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    csr = make_csr()
    svid = intermediate.issue_x509_svid_from_csr(pem(csr), WEB, now=now)
    assert check_leaf(svid.leaf) == SpiffeId(WEB)
    assert svid.leaf.public_key() == csr.public_key()


def test_csr_in_der_with_matching_san_is_signed(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    csr = make_csr((WEB,), ed25519.Ed25519PrivateKey.generate())
    svid = intermediate.issue_x509_svid_from_csr(
        csr.public_bytes(serialization.Encoding.DER), WEB, now=now
    )
    assert check_leaf(svid.leaf) == SpiffeId(WEB)


def test_csr_naming_another_id_is_refused(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    with pytest.raises(IssuanceError) as info:
        intermediate.issue_x509_svid_from_csr(pem(make_csr((WEB + "-admin",))), WEB, now=now)
    assert info.value.reason == "csr-spiffe-id-mismatch"
    with pytest.raises(IssuanceError) as info:
        intermediate.issue_x509_svid_from_csr(pem(make_csr((WEB, WEB + "2"))), WEB, now=now)
    assert info.value.reason == "csr-spiffe-id-mismatch"


def test_csr_whose_signature_does_not_verify_is_refused() -> None:
    der = bytearray(make_csr().public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature BIT STRING
    with pytest.raises(IssuanceError) as info:
        load_csr(bytes(der))
    assert info.value.reason == "csr-signature-invalid"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ],
)
def test_malformed_csrs_are_refused(data: bytes) -> None:
    with pytest.raises(IssuanceError) as info:
        load_csr(data)
    assert info.value.reason == "malformed-csr"


def test_oversized_csr_is_refused_before_parsing() -> None:
    with pytest.raises(IssuanceError) as info:
        load_csr(b"0" * (MAX_CSR_BYTES + 1))
    assert info.value.reason == "csr-too-large"


def test_csr_for_a_foreign_trust_domain_is_refused(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    foreign = "spiffe://other.test/ns/default/sa/web"
    with pytest.raises(IssuanceError) as info:
        intermediate.issue_x509_svid_from_csr(pem(make_csr((foreign,))), foreign, now=now)
    assert info.value.reason == "foreign-trust-domain"
