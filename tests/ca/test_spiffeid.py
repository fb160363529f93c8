"""SPIFFE IDs and trust domains: every example of the SPIFFE-ID standard, valid and invalid."""

from __future__ import annotations

import pytest

from ca import SpiffeId, SpiffeIdError, TrustDomain

VALID = [
    # The examples of SPIFFE-ID §2.2.
    "spiffe://staging.example.com/payments/mysql",
    "spiffe://staging.example.com/payments/web-fe",
    "spiffe://k8s-west.example.com/ns/staging/sa/default",
    "spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453",
    # A trust domain alone (the ID of a signing authority, SPIFFE-ID §3.1).
    "spiffe://example.org",
    # Every allowed character.
    "spiffe://a-b.c_d.0123456789/AZaz09.-_/x",
    "spiffe://trust.domain/.../a..b/.hidden",
]

INVALID = [
    ("", "empty"),
    ("http://example.org/a", "wrong-scheme"),
    ("spiffe:/example.org/a", "wrong-scheme"),
    ("example.org/a", "wrong-scheme"),
    ("spiffe://", "missing-trust-domain"),
    ("spiffe:///path", "missing-trust-domain"),
    ("spiffe://user@example.org/a", "userinfo-not-allowed"),
    ("spiffe://user:pass@example.org/a", "userinfo-not-allowed"),
    ("spiffe://example.org:8080/a", "port-not-allowed"),
    ("spiffe://example.org:/a", "port-not-allowed"),
    ("spiffe://example.org/a?x=1", "query-not-allowed"),
    ("spiffe://example.org?x=1", "query-not-allowed"),
    ("spiffe://example.org/a#frag", "fragment-not-allowed"),
    ("spiffe://example.org#frag", "fragment-not-allowed"),
    ("spiffe://exa mple.org/a", "bad-trust-domain-char"),
    ("spiffe://exämple.org/a", "bad-trust-domain-char"),
    ("spiffe://example%20.org/a", "bad-trust-domain-char"),
    ("spiffe://example.org/", "trailing-slash"),
    ("spiffe://example.org/a/", "trailing-slash"),
    ("spiffe://example.org//a", "empty-segment"),
    ("spiffe://example.org/a//b", "empty-segment"),
    ("spiffe://example.org/.", "dot-segment"),
    ("spiffe://example.org/..", "dot-segment"),
    ("spiffe://example.org/a/./b", "dot-segment"),
    ("spiffe://example.org/a/../b", "dot-segment"),
    ("spiffe://example.org/a b", "bad-path-segment-char"),
    ("spiffe://example.org/a%20b", "bad-path-segment-char"),
    ("spiffe://example.org/a:b", "bad-path-segment-char"),
    ("spiffe://example.org/ä", "bad-path-segment-char"),
    ("spiffe://example.org/a$b", "bad-path-segment-char"),
]


@pytest.mark.parametrize("uri", VALID)
def test_valid_spiffe_ids_parse_and_round_trip(uri: str) -> None:
    parsed = SpiffeId(uri)
    assert str(parsed) == uri
    assert SpiffeId(str(parsed)) == parsed


@pytest.mark.parametrize(("uri", "rule"), INVALID)
def test_invalid_spiffe_ids_name_the_broken_rule(uri: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId(uri)
    assert info.value.rule == rule
    assert rule in str(info.value)


def test_scheme_and_trust_domain_are_canonicalised_to_lowercase_but_path_is_kept() -> None:
    parsed = SpiffeId("SPIFFE://Example.ORG/Payments/MySQL")
    assert str(parsed) == "spiffe://example.org/Payments/MySQL"
    assert parsed == SpiffeId("spiffe://example.org/Payments/MySQL")
    assert parsed != SpiffeId("spiffe://example.org/payments/mysql")


def test_ids_longer_than_2048_bytes_are_rejected_and_2048_accepted() -> None:
    prefix = "spiffe://example.org/"
    exact = prefix + "a" * (2048 - len(prefix))
    assert len(str(SpiffeId(exact))) == 2048
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId(exact + "b")
    assert info.value.rule == "too-long"


def test_trust_domain_longer_than_255_bytes_is_rejected() -> None:
    with pytest.raises(SpiffeIdError) as info:
        TrustDomain("a" * 256)
    assert info.value.rule == "trust-domain-too-long"
    assert TrustDomain("a" * 255).name == "a" * 255


def test_ids_are_hashable_and_equal_by_canonical_form() -> None:
    ids = {SpiffeId("spiffe://Example.org/a"), SpiffeId("spiffe://example.org/a")}
    assert len(ids) == 1
    assert sorted([SpiffeId("spiffe://b.org/x"), SpiffeId("spiffe://a.org/x")])[
        0
    ].trust_domain == TrustDomain("a.org")


def test_trust_domain_accepts_a_name_or_an_id_and_rejects_paths() -> None:
    assert TrustDomain("spiffe://example.org/ns/x") == TrustDomain("example.org")
    assert TrustDomain("EXAMPLE.org").id_string() == "spiffe://example.org"
    with pytest.raises(SpiffeIdError):
        TrustDomain("example.org/path")
    with pytest.raises(SpiffeIdError):
        TrustDomain("")


def test_spiffe_id_parts_and_membership() -> None:
    parsed = SpiffeId("spiffe://example.org/ns/default/sa/web")
    assert parsed.trust_domain == TrustDomain("example.org")
    assert parsed.path == "/ns/default/sa/web"
    assert parsed.member_of(TrustDomain("example.org"))
    assert not parsed.member_of(TrustDomain("example.com"))
    assert SpiffeId.from_parts("example.org", "/a") == SpiffeId("spiffe://example.org/a")


def test_non_strings_are_a_type_error_not_a_parse_error() -> None:
    with pytest.raises(TypeError):
        SpiffeId(b"spiffe://example.org/a")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("candidate", "prefix", "expected"),
    [
        ("spiffe://td/ns/web", "spiffe://td/ns/web", True),
        ("spiffe://td/ns/web/x", "spiffe://td/ns/web", True),
        ("spiffe://td/ns/webhook", "spiffe://td/ns/web", False),
        ("spiffe://td/ns", "spiffe://td/ns/web", False),
        ("spiffe://td/anything", "spiffe://td", True),
        ("spiffe://other/ns/web", "spiffe://td/ns/web", False),
        ("spiffe://other/ns/web", "spiffe://td", False),
    ],
)
def test_is_under_matches_whole_path_segments_within_one_trust_domain(
    candidate: str, prefix: str, expected: bool
) -> None:
    assert SpiffeId(candidate).is_under(SpiffeId(prefix)) is expected
