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


def test_sign_csr_der_gives_the_leaf_the_svid_path_gives(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    """The CA server's DER path: same checks, same leaf, no parse-and-re-encode."""
    now = now.replace(microsecond=654321)  # the certificate keeps whole seconds
    csr = make_csr((WEB,))
    der, not_after = intermediate.sign_csr_der(
        csr.public_bytes(serialization.Encoding.DER), WEB, now=now, dns_names=("web.test",)
    )
    leaf = x509.load_der_x509_certificate(der)
    assert check_leaf(leaf) == SpiffeId(WEB)
    assert leaf.public_key() == csr.public_key()
    assert not_after == leaf.not_valid_after_utc
    leaf.verify_directly_issued_by(intermediate.certificate)
    assert intermediate.certificate_der == intermediate.certificate.public_bytes(
        serialization.Encoding.DER
    )
    svid = intermediate.issue_x509_svid_from_csr(csr, WEB, now=now, dns_names=("web.test",))
    assert svid.expires_at == not_after
    san = x509.SubjectAlternativeName
    assert (
        leaf.extensions.get_extension_for_class(san).value
        == svid.leaf.extensions.get_extension_for_class(san).value
    )


@pytest.mark.parametrize("method", ["issue_x509_svid_from_csr", "sign_csr_der"])
@pytest.mark.parametrize(
    ("uris", "spiffe_id", "ttl", "reason"),
    [
        ((WEB + "-admin",), WEB, dt.timedelta(hours=1), "csr-spiffe-id-mismatch"),
        ((), "spiffe://other.test/ns/x", dt.timedelta(hours=1), "foreign-trust-domain"),
        ((), "spiffe://example.org", dt.timedelta(hours=1), "missing-path"),
        ((), "https://example.org/ns/x", dt.timedelta(hours=1), "malformed-spiffe-id"),
        ((), WEB, dt.timedelta(hours=25), "ttl-too-long"),
    ],
)
def test_both_csr_paths_refuse_alike(
    intermediate: IntermediateAuthority,
    now: dt.datetime,
    method: str,
    uris: tuple[str, ...],
    spiffe_id: str,
    ttl: dt.timedelta,
    reason: str,
) -> None:
    sign = getattr(intermediate, method)
    for _ in range(2):  # the second time too: a refused ID is not remembered as checked
        with pytest.raises(IssuanceError) as info:
            sign(pem(make_csr(uris)), spiffe_id, now=now, ttl=ttl)
        assert info.value.reason == reason


def test_checked_workload_ids_are_remembered_within_a_bound(
    intermediate: IntermediateAuthority, now: dt.datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ca.authority

    monkeypatch.setattr(ca.authority, "_CHECKED_IDS_MAX", 3)
    csr = make_csr()
    ids = [f"{WEB}/{n}" for n in range(7)]
    for spiffe_id in ids:
        der, _ = intermediate.sign_csr_der(csr, spiffe_id, now=now)
        assert check_leaf(x509.load_der_x509_certificate(der)) == SpiffeId(spiffe_id)
        assert len(intermediate._checked_ids) <= 3
    assert intermediate._own_spiffe_id(ids[-1]) is intermediate._own_spiffe_id(ids[-1])
