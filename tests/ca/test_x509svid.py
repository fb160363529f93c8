"""Issued X509-SVIDs follow the SPIFFE X509-SVID standard; leaves that break it are refused."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from ca import (
    IntermediateAuthority,
    IssuanceError,
    KeyAlgorithm,
    RootAuthority,
    SpiffeId,
    SvidError,
    check_leaf,
    generate_private_key,
)
from ca.x509svid import CLOCK_SKEW
from tests.ca.svid_fixtures import NEGATIVE_LEAVES

WEB = SpiffeId("spiffe://example.org/ns/default/sa/web")


def test_issued_leaf_has_exactly_the_spiffe_profile(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    svid = intermediate.issue_x509_svid(WEB, key.public_key(), now=now)
    leaf = svid.leaf
    ext = leaf.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = intermediate.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    )
    assert aki.key_identifier == issuer_ski.value.digest
    assert leaf.not_valid_before_utc == now - CLOCK_SKEW
    assert leaf.not_valid_after_utc == now + dt.timedelta(hours=1)
    assert svid.chain == (leaf, intermediate.certificate)
    assert check_leaf(leaf) == WEB


def test_serials_are_random_positive_and_about_128_bits(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    serials = {
        intermediate.issue_x509_svid(WEB, key, now=now).leaf.serial_number for _ in range(32)
    }
    assert len(serials) == 32
    assert all(0 < s < 2**159 for s in serials)
    assert max(s.bit_length() for s in serials) >= 120


@pytest.mark.parametrize("name", sorted(NEGATIVE_LEAVES))
def test_leaf_breaking_a_rule_is_rejected_naming_that_rule(
    name: str, intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    build, rule = NEGATIVE_LEAVES[name]
    with pytest.raises(SvidError) as info:
        check_leaf(build(intermediate, now))
    assert info.value.rule == rule


def test_ttl_over_24_hours_is_refused(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert intermediate.issue_x509_svid(WEB, key, now=now, ttl=dt.timedelta(hours=24))
    with pytest.raises(IssuanceError) as info:
        intermediate.issue_x509_svid(WEB, key, now=now, ttl=dt.timedelta(hours=24, seconds=1))
    assert info.value.reason == "ttl-too-long"
    with pytest.raises(IssuanceError) as info:
        intermediate.issue_x509_svid(WEB, key, now=now, ttl=dt.timedelta(0))
    assert info.value.reason == "bad-ttl"


def test_leaf_never_outlives_its_intermediate(root: RootAuthority, now: dt.datetime) -> None:
    short = root.issue_intermediate("short", now=now, ttl=dt.timedelta(minutes=30))
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(IssuanceError) as info:
        short.issue_x509_svid(WEB, key, now=now, ttl=dt.timedelta(hours=1))
    assert info.value.reason == "outlives-issuer"
    ok = short.issue_x509_svid(WEB, key, now=now, ttl=dt.timedelta(minutes=29))
    assert ok.leaf.not_valid_after_utc <= short.certificate.not_valid_after_utc


def test_intermediate_refuses_ids_of_another_trust_domain(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(IssuanceError) as info:
        intermediate.issue_x509_svid("spiffe://other.test/ns/default/sa/web", key, now=now)
    assert info.value.reason == "foreign-trust-domain"
    with pytest.raises(IssuanceError) as info:
        intermediate.issue_x509_svid("spiffe://example.org", key, now=now)
    assert info.value.reason == "missing-path"
    with pytest.raises(IssuanceError) as info:
        intermediate.issue_x509_svid("spiffe://example.org/a/../b", key, now=now)
    assert info.value.reason == "malformed-spiffe-id"


@pytest.mark.parametrize(
    ("algorithm", "key_type"),
    [
        (KeyAlgorithm.P256, ec.EllipticCurvePublicKey),
        (KeyAlgorithm.P384, ec.EllipticCurvePublicKey),
        (KeyAlgorithm.ED25519, ed25519.Ed25519PublicKey),
        (KeyAlgorithm.RSA2048, rsa.RSAPublicKey),
        (KeyAlgorithm.MLDSA65, mldsa.MLDSA65PublicKey),
    ],
)
def test_workload_key_types_that_are_accepted(
    algorithm: KeyAlgorithm, key_type: type, intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    key = generate_private_key(algorithm)
    svid = intermediate.issue_x509_svid(WEB, key.public_key(), now=now)
    assert isinstance(svid.leaf.public_key(), key_type)
    assert check_leaf(svid.leaf) == WEB


def test_weak_or_unusual_keys_are_refused(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    weak_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(IssuanceError) as info:
        intermediate.issue_x509_svid(WEB, weak_rsa, now=now)
    assert info.value.reason == "unsupported-key"
    k1 = ec.generate_private_key(ec.SECP256K1()).public_key()
    with pytest.raises(IssuanceError):
        intermediate.issue_x509_svid(WEB, k1, now=now)


def test_root_and_intermediate_shapes(
    root: RootAuthority, intermediate: IntermediateAuthority
) -> None:
    rc = root.certificate
    assert rc.issuer == rc.subject
    assert isinstance(rc.public_key(), ec.EllipticCurvePublicKey)
    assert rc.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    assert (rc.not_valid_after_utc - rc.not_valid_before_utc) >= dt.timedelta(days=3650)
    ic = intermediate.certificate
    bc = ic.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ic.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    san = ic.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    nc = ic.extensions.get_extension_for_oid(ExtensionOID.NAME_CONSTRAINTS)
    assert nc.critical
    assert list(nc.value.permitted_subtrees) == [x509.UniformResourceIdentifier("example.org")]  # type: ignore[attr-defined]
    assert (ic.not_valid_after_utc - ic.not_valid_before_utc) <= dt.timedelta(days=30, seconds=30)
    assert intermediate.cluster == "west"


def test_intermediate_cannot_outlive_root(root: RootAuthority, now: dt.datetime) -> None:
    with pytest.raises(IssuanceError) as info:
        root.issue_intermediate("forever", now=now, ttl=dt.timedelta(days=3651))
    assert info.value.reason == "outlives-issuer"


@pytest.mark.parametrize("name", ["", "-x", "a/b", "..", "x" * 64, "ünï"])
def test_bad_cluster_names_are_refused(name: str, root: RootAuthority, now: dt.datetime) -> None:
    with pytest.raises(IssuanceError) as info:
        root.issue_intermediate(name, now=now)
    assert info.value.reason == "bad-cluster-name"


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.P256, KeyAlgorithm.ED25519])
def test_roots_of_other_key_types_sign_working_hierarchies(
    algorithm: KeyAlgorithm, now: dt.datetime
) -> None:
    from ca import TrustDomain, verify_x509_svid

    root = RootAuthority.create(TrustDomain("alt.test"), now=now, key_algorithm=algorithm)
    inter = root.issue_intermediate("c", now=now)
    svid = inter.issue_x509_svid(
        "spiffe://alt.test/w", generate_private_key(KeyAlgorithm.P256).public_key(), now=now
    )
    verified = verify_x509_svid(svid.chain, {root.trust_domain: [root.certificate]}, now=now)
    assert str(verified.spiffe_id) == "spiffe://alt.test/w"


def test_concatenated_der_chain_round_trips_and_refuses_malformed_bytes(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    from ca.x509svid import load_der_chain

    svid = intermediate.issue_x509_svid(
        WEB, ec.generate_private_key(ec.SECP256R1()).public_key(), now=now
    )
    joined = b"".join(svid.chain_der())
    assert load_der_chain(joined) == list(svid.chain)
    assert load_der_chain(b"") == []
    for bad in (
        joined[:-1],
        b"\x31" + joined[1:],
        b"\x30",
        b"\x30\x85\x01\x02\x03\x04\x05",
        joined + b"\x00",
    ):
        with pytest.raises(ValueError):
            load_der_chain(bad)
