# ruff: noqa: E501  (tables of cases read best one per line)
"""Authorisation decisions are pure: rules, defaults, the operator's document."""

from __future__ import annotations

import pytest

from ca.spiffeid import SpiffeId, TrustDomain
from sidecar.policy import (
    Authorizer,
    PolicyError,
    authorizer_from_document,
    parse_pod_labels,
    parse_rules,
)

TD = TrustDomain("example.org")
WEB = SpiffeId("spiffe://example.org/ns/web/sa/frontend")
WEBHOOK = SpiffeId("spiffe://example.org/ns/webhook/sa/x")
FOREIGN = SpiffeId("spiffe://other.example/ns/web/sa/frontend")


def test_a_prefix_matches_whole_path_segments_only() -> None:
    auth = Authorizer({8080: parse_rules([{"prefix": "spiffe://example.org/ns/web"}], "allow")})
    assert auth.decide(WEB, 8080, TD).allowed
    assert not auth.decide(WEBHOOK, 8080, TD).allowed
    assert not auth.decide(FOREIGN, 8080, TD).allowed


def test_a_trust_domain_prefix_admits_the_whole_domain_and_nothing_else() -> None:
    auth = Authorizer({8080: parse_rules([{"prefix": "spiffe://other.example"}], "allow")})
    assert auth.decide(FOREIGN, 8080, TD).allowed
    assert not auth.decide(WEB, 8080, TD).allowed


def test_an_uncovered_port_admits_only_our_own_trust_domain() -> None:
    auth = Authorizer({8080: ()})
    assert auth.decide(WEB, 9090, TD).allowed
    assert not auth.decide(FOREIGN, 9090, TD).allowed
    assert not auth.decide(WEB, 8080, TD).allowed  # empty allow list: deny-all
    assert not auth.decide(None, 9090, TD).allowed


def test_bad_rules_name_their_index() -> None:
    with pytest.raises(PolicyError) as info:
        parse_rules([{"exact": "spiffe://example.org/a"}, {"regex": ".*"}], "allow")
    assert info.value.field == "allow[1]"


def test_the_operator_document_applies_only_policies_selecting_this_pod() -> None:
    document = {
        "kind": "SidecarPolicy",
        "policies": [
            {
                "name": "api",
                "selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["api"]}]},
                "ports": [8080],
                "allow": [{"exact": str(WEB)}],
            },
            {
                "name": "db",
                "selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["db"]}]},
                "ports": [],
                "allow": [],
            },
            {"name": "everyone", "selector": {}, "ports": [9090], "allow": [{"prefix": "spiffe://other.example"}]},
        ],
    }  # fmt: skip
    api = authorizer_from_document(document, {"app": "api"})
    assert api.decide(WEB, 8080, TD).allowed
    assert not api.decide(WEBHOOK, 8080, TD).allowed
    assert api.decide(FOREIGN, 9090, TD).allowed
    assert api.decide(WEBHOOK, 7070, TD).allowed  # uncovered: same trust domain
    db = authorizer_from_document(document, {"app": "db"})
    assert not db.decide(WEB, 5432, TD).allowed  # an empty allow with no ports: deny-all


def test_downward_api_labels_are_parsed_with_their_quoting() -> None:
    text = 'app="api"\npod-template-hash="5d8f"\nnote="say \\"hi\\""\n'
    assert parse_pod_labels(text) == {"app": "api", "pod-template-hash": "5d8f", "note": 'say "hi"'}
    with pytest.raises(PolicyError):
        parse_pod_labels("no equals sign")


def test_a_bad_document_names_the_json_path_once() -> None:
    document = {"policies": [{"selector": {"matchLabels": {"-app": "api"}}, "allow": []}]}
    with pytest.raises(PolicyError) as info:
        authorizer_from_document(document, {"app": "api"})
    assert str(info.value) == (
        "policy.policies[0].selector.matchLabels: '-app' is not a valid label key"
    )


def test_a_malformed_policy_for_other_pods_still_refuses_the_whole_document() -> None:
    """Every sidecar of the namespace reads the same document: one that is broken anywhere
    is refused by all of them alike, not applied in part by the pods it does not select."""
    document = {
        "policies": [
            {"selector": {"matchLabels": {"app": "api"}}, "allow": [{"exact": str(WEB)}]},
            {"selector": {"matchLabels": {"app": "db"}}, "allow": [{"regex": ".*"}]},
        ]
    }
    with pytest.raises(PolicyError) as info:
        authorizer_from_document(document, {"app": "api"})
    assert info.value.field == "policy.policies[1].allow[0]"
