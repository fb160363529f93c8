"""SPIFFE bundles: produce, parse, merge for root rotation, and refuse malformed documents."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from cryptography.hazmat.primitives import serialization

from ca import BundleError, JwtAuthority, RootAuthority, TrustBundle, TrustDomain
from ca.bundle import MAX_BUNDLE_BYTES

TD = TrustDomain("example.org")


def test_bundle_round_trips_with_x509_and_jwt_entries(root: RootAuthority) -> None:
    jwt = JwtAuthority.generate()
    bundle = TrustBundle(
        TD, (root.certificate,), {jwt.key_id: jwt.public_key}, sequence=7, refresh_hint=60
    )
    doc = json.loads(bundle.to_json())
    x509_entry, jwt_entry = doc["keys"]
    assert (
        x509_entry["use"] == "x509-svid"
        and x509_entry["kty"] == "EC"
        and x509_entry["crv"] == "P-384"
    )
    assert base64.b64decode(x509_entry["x5c"][0]) == root.certificate.public_bytes(
        serialization.Encoding.DER
    )
    assert jwt_entry["use"] == "jwt-svid" and jwt_entry["kid"] == jwt.key_id
    assert doc["spiffe_sequence"] == 7 and doc["spiffe_refresh_hint"] == 60
    parsed = TrustBundle.from_json(TD, bundle.to_json())
    assert parsed.x509_authorities == (root.certificate,)
    assert dict(parsed.jwt_authorities) == {jwt.key_id: jwt.public_key}
    assert (parsed.sequence, parsed.refresh_hint) == (7, 60)


def test_merge_keeps_old_and_new_roots_and_bumps_sequence(now: dt.datetime) -> None:
    old, new = RootAuthority.create(TD, now=now), RootAuthority.create(TD, now=now)
    first = TrustBundle(TD, (old.certificate,), sequence=3)
    merged = first.merge(TrustBundle(TD, (new.certificate,)))
    assert merged.x509_authorities == (old.certificate, new.certificate)
    assert merged.sequence == 4
    assert merged.merge(TrustBundle(TD, (new.certificate,))) is merged  # no change, same sequence
    assert merged.without_x509_authority(old.certificate).x509_authorities == (new.certificate,)


def test_bundles_of_different_trust_domains_do_not_merge(root: RootAuthority) -> None:
    with pytest.raises(BundleError):
        TrustBundle(TD).merge(TrustBundle(TrustDomain("other.test")))


def test_pem_form_lists_the_roots(root: RootAuthority) -> None:
    assert TrustBundle(TD, (root.certificate,)).to_pem() == root.certificate.public_bytes(
        serialization.Encoding.PEM
    )


def test_unknown_use_entries_are_ignored(root: RootAuthority) -> None:
    doc = json.loads(TrustBundle(TD, (root.certificate,)).to_json())
    doc["keys"].append({"use": "future-svid", "kty": "EC"})
    assert len(TrustBundle.from_json(TD, json.dumps(doc)).x509_authorities) == 1


def _doc(root: RootAuthority) -> dict:  # type: ignore[type-arg]
    return json.loads(TrustBundle(TD, (root.certificate,)).to_json())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: "not json", "not JSON"),
        (lambda d: [], "'keys' array"),
        (lambda d: {"keys": {}}, "'keys' array"),
        (lambda d: {**d, "spiffe_sequence": -1}, "spiffe_sequence"),
        (lambda d: {**d, "spiffe_refresh_hint": "soon"}, "spiffe_refresh_hint"),
        (lambda d: {"keys": [dict(d["keys"][0], x5c=[])]}, "exactly one x5c"),
        (lambda d: {"keys": [dict(d["keys"][0], x5c=["a", "b"])]}, "exactly one x5c"),
        (lambda d: {"keys": [dict(d["keys"][0], x5c=["!!notbase64"])]}, "not a DER certificate"),
        (lambda d: {"keys": [dict(d["keys"][0], x="AAAA")]}, "must be 48 bytes"),
        (lambda d: {"keys": [{"use": "jwt-svid", "kty": "EC", "crv": "P-256"}]}, "kid"),
        (lambda d: {"keys": ["string"]}, "not an object"),
    ],
)
def test_malformed_bundles_are_refused_with_a_clear_error(
    mutate, message: str, root: RootAuthority
) -> None:  # type: ignore[no-untyped-def]
    doc = mutate(_doc(root))
    data = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(BundleError, match=message):
        TrustBundle.from_json(TD, data)


def test_x5c_key_must_match_the_declared_jwk(
    root: RootAuthority, other_root: RootAuthority
) -> None:
    doc = _doc(root)
    doc["keys"][0]["x5c"] = _doc(other_root)["keys"][0]["x5c"]
    with pytest.raises(BundleError):
        TrustBundle.from_json(TD, json.dumps(doc))


def test_oversized_bundle_is_refused() -> None:
    with pytest.raises(BundleError, match="limit"):
        TrustBundle.from_json(TD, b" " * (MAX_BUNDLE_BYTES + 1))


def test_duplicate_kids_are_refused() -> None:
    jwt = JwtAuthority.generate()
    entry = json.loads(TrustBundle(TD, jwt_authorities={jwt.key_id: jwt.public_key}).to_json())[
        "keys"
    ][0]
    with pytest.raises(BundleError, match="duplicate kid"):
        TrustBundle.from_json(TD, json.dumps({"keys": [entry, entry]}))
