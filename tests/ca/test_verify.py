"""Chain verification against bundles, including the URI name constraint across trust domains."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from cryptography.x509.verification import VerificationError as PycaError

from ca import (
    IntermediateAuthority,
    RootAuthority,
    TrustBundle,
    TrustDomain,
    VerificationError,
    X509Svid,
    verify_x509_svid,
)
from tests.ca.svid_fixtures import DIGITAL_SIGNATURE, build_leaf

WEB = "spiffe://example.org/ns/default/sa/web"


def issue(
    intermediate: IntermediateAuthority, now: dt.datetime, ttl: dt.timedelta = dt.timedelta(hours=1)
) -> X509Svid:
    return intermediate.issue_x509_svid(
        WEB, ec.generate_private_key(ec.SECP256R1()).public_key(), now=now, ttl=ttl
    )


def bundles(*roots: RootAuthority) -> dict[TrustDomain, list]:  # type: ignore[type-arg]
    out: dict[TrustDomain, list] = {}  # type: ignore[type-arg]
    for r in roots:
        out.setdefault(r.trust_domain, []).append(r.certificate)
    return out


def test_issued_chain_verifies_to_its_root(
    root: RootAuthority, intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    svid = issue(intermediate, now)
    verified = verify_x509_svid(svid.chain, bundles(root), now=now)
    assert str(verified.spiffe_id) == WEB
    assert verified.path == (svid.leaf, intermediate.certificate, root.certificate)


def test_leaf_alone_without_intermediate_is_unknown_ca(
    root: RootAuthority, intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    with pytest.raises(VerificationError) as info:
        verify_x509_svid([issue(intermediate, now).leaf], bundles(root), now=now)
    assert info.value.reason == "unknown-ca"


def test_expired_and_not_yet_valid_leaves_are_refused(
    root: RootAuthority, intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    svid = issue(intermediate, now, ttl=dt.timedelta(minutes=5))
    with pytest.raises(VerificationError) as info:
        verify_x509_svid(svid.chain, bundles(root), now=now + dt.timedelta(minutes=6))
    assert info.value.reason == "expired"
    with pytest.raises(VerificationError) as info:
        verify_x509_svid(svid.chain, bundles(root), now=now - dt.timedelta(minutes=5))
    assert info.value.reason == "not-yet-valid"


def test_chain_from_another_trust_domain_is_unknown(
    root: RootAuthority,
    other_root: RootAuthority,
    other_intermediate: IntermediateAuthority,
    now: dt.datetime,
) -> None:
    svid = other_intermediate.issue_x509_svid(
        "spiffe://other.test/w", ec.generate_private_key(ec.SECP256R1()).public_key(), now=now
    )
    with pytest.raises(VerificationError) as info:
        verify_x509_svid(svid.chain, bundles(root), now=now)
    assert info.value.reason == "unknown-trust-domain"
    # A bundle that claims other.test but holds example.org's root: the path does not build.
    with pytest.raises(VerificationError) as info:
        verify_x509_svid(svid.chain, {TrustDomain("other.test"): [root.certificate]}, now=now)
    assert info.value.reason == "unknown-ca"
    assert verify_x509_svid(svid.chain, bundles(root, other_root), now=now)


def test_leaked_intermediate_cannot_mint_a_foreign_identity(
    root: RootAuthority, intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    """A leaf for other.test signed with example.org's intermediate key, bypassing our issuer,
    is refused by the name constraint even where example.org's root is trusted for other.test."""
    forged = build_leaf(
        intermediate, now, uris=("spiffe://other.test/ns/default/sa/web",), ku=DIGITAL_SIGNATURE
    )
    lookup = {TrustDomain("other.test"): [root.certificate]}
    with pytest.raises(VerificationError) as info:
        verify_x509_svid([forged, intermediate.certificate], lookup, now=now)
    assert info.value.reason == "name-constraint-violation"


def test_tampered_leaf_signature_is_unknown_ca(
    root: RootAuthority, intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    other = root.issue_intermediate("west", now=now)  # same subject, different key
    svid = issue(intermediate, now)
    with pytest.raises(VerificationError) as info:
        verify_x509_svid([svid.leaf, other.certificate], bundles(root), now=now)
    assert info.value.reason == "unknown-ca"


def test_root_rotation_bundle_verifies_old_and_new_chains(now: dt.datetime) -> None:
    td = TrustDomain("rotate.test")
    old, new = RootAuthority.create(td, now=now), RootAuthority.create(td, now=now)
    bundle = TrustBundle(td, (old.certificate,)).merge(TrustBundle(td, (new.certificate,)))
    for r in (old, new):
        inter = r.issue_intermediate("c", now=now)
        svid = inter.issue_x509_svid(
            "spiffe://rotate.test/w", ec.generate_private_key(ec.SECP256R1()).public_key(), now=now
        )
        assert verify_x509_svid(svid.chain, {td: bundle.x509_authorities}, now=now)
    retired = bundle.without_x509_authority(old.certificate)
    inter = old.issue_intermediate("c", now=now)
    svid = inter.issue_x509_svid(
        "spiffe://rotate.test/w", ec.generate_private_key(ec.SECP256R1()).public_key(), now=now
    )
    with pytest.raises(VerificationError):
        verify_x509_svid(svid.chain, {td: retired.x509_authorities}, now=now)


def test_cryptography_client_verifier_accepts_uri_only_leaves_from_unconstrained_intermediates(
    root: RootAuthority, now: dt.datetime
) -> None:
    inter = root.issue_intermediate("plain", now=now, name_constraints=False)
    svid = inter.issue_x509_svid(WEB, ec.generate_private_key(ec.SECP256R1()).public_key(), now=now)
    verifier = PolicyBuilder().store(Store([root.certificate])).time(now).build_client_verifier()
    result = verifier.verify(svid.leaf, [inter.certificate])
    assert [u.value for u in result.subjects or []] == [WEB]  # type: ignore[attr-defined]


def test_cryptography_client_verifier_refuses_uri_name_constraints_which_is_why_ca_verify_exists(
    root: RootAuthority, intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    svid = issue(intermediate, now)
    verifier = PolicyBuilder().store(Store([root.certificate])).time(now).build_client_verifier()
    with pytest.raises(PycaError, match="unsupported name constraint"):
        verifier.verify(svid.leaf, [intermediate.certificate])
    assert verify_x509_svid(svid.chain, bundles(root), now=now)


def test_empty_chain_is_missing_certificate(root: RootAuthority, now: dt.datetime) -> None:
    with pytest.raises(VerificationError) as info:
        verify_x509_svid([], bundles(root), now=now)
    assert info.value.reason == "missing-certificate"
