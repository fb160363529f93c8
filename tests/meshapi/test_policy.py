"""The SidecarPolicy document has one owner: what the operator renders, the sidecar parses
back to the same value, and a bad document is refused naming its JSON path once.

Property tests generate documents from the value side (``parse(render(d)) == d``) and
check the canonical JSON from the text side (``render(parse(x)) == x``); the operator's
own output from ``compile_policies`` is checked the same way, through ``json``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ca.spiffeid import SpiffeId, TrustDomain
from core.errors import FieldError
from core.labels import LabelSelector, Requirement
from mesh_operator.reconcile import ClusterSnapshot, PodView, compile_policies
from meshapi.policy import (
    API_VERSION,
    KIND,
    CallerRule,
    Policy,
    PolicyDocument,
    parse_policy_document,
    render_policy_document,
)

CANONICAL: dict[str, Any] = {
    "apiVersion": "trellis.dev/v1alpha1",
    "kind": "SidecarPolicy",
    "namespace": "shop",
    "trustDomain": "example.org",
    "policies": [
        {
            "name": "ledger",
            "selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]},
            "ports": [8080],
            "allow": [
                {"exact": "spiffe://example.org/ns/front/sa/web"},
                {"prefix": "spiffe://example.org/ns/tools"},
            ],
            "mtls": "PERMISSIVE",
        },
        {
            "name": "closed",
            "selector": {"matchExpressions": []},
            "ports": [],
            "allow": [],
            "mtls": "STRICT",
        },
        {"name": "no-mode", "selector": {"matchExpressions": []}, "ports": [443], "allow": []},
    ],
}

# --- strategies ---------------------------------------------------------------------------

_names = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True)
_label_keys = st.one_of(_names, _names.map(lambda n: f"example.com/{n}"))
_label_values = st.one_of(st.just(""), st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True))


@st.composite
def _requirements(draw: st.DrawFn) -> Requirement:
    operator = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
    values: frozenset[str] = frozenset()
    if operator in ("In", "NotIn"):
        values = draw(st.frozensets(_label_values, min_size=1, max_size=3))
    return Requirement(draw(_label_keys), operator, values)


_trust_domains = st.from_regex(r"[a-z][a-z0-9]{0,7}\.(org|example)", fullmatch=True)
_spiffe_ids = st.builds(
    lambda td, segments: SpiffeId(f"spiffe://{td}" + "".join(f"/{s}" for s in segments)),
    _trust_domains,
    st.lists(st.from_regex(r"[a-z0-9._-]{0,5}[a-z0-9]", fullmatch=True), max_size=3),
)
_policies = st.builds(
    Policy,
    name=st.one_of(st.none(), st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)),
    selector=st.builds(LabelSelector, st.lists(_requirements(), max_size=3).map(tuple)),
    ports=st.lists(st.integers(1, 65535), max_size=4).map(tuple),
    allow=st.lists(st.builds(CallerRule, _spiffe_ids, st.booleans()), max_size=4).map(tuple),
    mtls=st.sampled_from([None, "STRICT", "PERMISSIVE"]),
    protocol=st.sampled_from([None, "tcp", "http"]),
)
_documents = st.builds(
    PolicyDocument,
    policies=st.lists(_policies, max_size=4).map(tuple),
    namespace=st.one_of(st.none(), _names),
    trust_domain=st.one_of(st.none(), _trust_domains.map(TrustDomain)),
)


def _as_json(value: Any) -> Any:
    """Exactly what a sidecar reads from the ConfigMap: the operator's text, decoded."""
    return json.loads(json.dumps(value, indent=2, sort_keys=True))


# --- round trips --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(_documents)
def test_a_rendered_document_parses_back_to_the_same_value(document: PolicyDocument) -> None:
    assert parse_policy_document(_as_json(render_policy_document(document))) == document


@settings(max_examples=200, deadline=None)
@given(_documents)
def test_canonical_json_renders_back_unchanged(document: PolicyDocument) -> None:
    canonical = _as_json(render_policy_document(document))
    assert render_policy_document(parse_policy_document(canonical)) == canonical


def test_the_documented_canonical_form_renders_back_unchanged() -> None:
    parsed = parse_policy_document(CANONICAL)
    assert render_policy_document(parsed) == CANONICAL
    assert parsed.trust_domain == TrustDomain("example.org")
    assert parsed.policies[0].allow[1] == CallerRule(
        SpiffeId("spiffe://example.org/ns/tools"), prefix=True
    )


def test_what_the_operator_compiles_is_canonical_and_reads_back_as_it_was_built() -> None:
    policies = {
        "shop/ledger": {
            "metadata": {"name": "ledger", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": {"app": "web", "tier": "front"}},
                "ports": [8443, 8080],
                "mtls": "PERMISSIVE",
                "protocol": "http",
                "allow": [
                    {"prefix": "spiffe://example.org/ns/front"},
                    {"exact": "spiffe://partner.example/ns/pay/sa/api"},
                ],
            },
        },
        "shop/closed": {"metadata": {"name": "closed", "namespace": "shop"}, "spec": {}},
    }
    web = PodView("shop", "web-1", "web", "node-a", {"app": "web", "tier": "front"}, "Running")
    snapshot = ClusterSnapshot(TrustDomain("example.org"), policies=policies, pods={web.key: web})
    rendered = _as_json(compile_policies(snapshot).documents["shop"])
    document = parse_policy_document(rendered)
    assert render_policy_document(document) == rendered
    assert (document.namespace, document.trust_domain) == ("shop", TrustDomain("example.org"))
    assert [p.name for p in document.policies] == ["closed", "ledger"]
    ledger = document.policies[1]
    assert ledger.ports == (8080, 8443)
    assert ledger.mtls == "PERMISSIVE"
    assert ledger.protocol == "http"
    assert document.policies[0].mtls is None  # a spec without the field names no mode
    assert document.policies[0].protocol is None
    assert [p.name for p in document.selecting(web.labels)] == ["closed", "ledger"]
    assert [p.name for p in document.selecting({"app": "web"})] == ["closed"]


def test_a_document_without_the_optional_fields_reads_with_their_defaults() -> None:
    minimal = {"policies": [{"selector": {"matchLabels": {"app": "api"}}, "ports": [8080]}]}
    (policy,) = parse_policy_document(minimal).policies
    assert policy == Policy(selector=LabelSelector.parse({"matchLabels": {"app": "api"}}, "s"),
                            ports=(8080,))  # fmt: skip
    assert render_policy_document(parse_policy_document(minimal)) == {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "policies": [
            {
                "selector": {
                    "matchExpressions": [{"key": "app", "operator": "In", "values": ["api"]}]
                },
                "ports": [8080],
                "allow": [],
            }
        ],
    }
    assert parse_policy_document({}) == PolicyDocument()


def test_the_withdrawn_early_data_field_of_older_documents_is_ignored() -> None:
    """No data plane ever read ``earlyDataMethods``; a document an older operator wrote
    with it still reads, as if it were not there."""
    older = {**CANONICAL, "policies": [{**CANONICAL["policies"][0],
                                        "earlyDataMethods": ["GET"]}]}  # fmt: skip
    assert parse_policy_document(older).policies == parse_policy_document(CANONICAL).policies[:1]


def test_a_policy_names_the_protocol_its_app_speaks() -> None:
    """``protocol: http`` is read (a refused caller then gets an HTTP 403) and rendered back;
    anything but tcp or http is refused with the field's path."""
    http = {**CANONICAL, "policies": [{**CANONICAL["policies"][0], "protocol": "http"}]}
    document = parse_policy_document(http)
    assert document.policies[0].protocol == "http"
    assert render_policy_document(document)["policies"][0]["protocol"] == "http"
    assert parse_policy_document(CANONICAL).policies[0].protocol is None
    with pytest.raises(FieldError, match=r"policies\[0\]\.protocol.*tcp or http"):
        parse_policy_document(
            {**CANONICAL, "policies": [{**CANONICAL["policies"][0], "protocol": "grpc"}]}
        )


def test_fields_a_newer_operator_adds_are_ignored() -> None:
    newer = {**CANONICAL, "revision": 7, "policies": [{**CANONICAL["policies"][0], "x": 1}]}
    assert parse_policy_document(newer).policies == parse_policy_document(CANONICAL).policies[:1]


# --- errors -------------------------------------------------------------------------------


def _with_policy(**fields: Any) -> dict[str, Any]:
    return {"policies": [{"name": "ok"}, {"name": "bad", **fields}]}


@pytest.mark.parametrize(
    ("document", "field", "words"),
    [
        ([], "policy", "expected a JSON object (kind SidecarPolicy)"),
        ({"kind": "AccessPolicy"}, "policy.kind", "is not 'SidecarPolicy'"),
        ({"apiVersion": "trellis.dev/v2"}, "policy.apiVersion", "is not 'trellis.dev/v1alpha1'"),
        ({"trustDomain": "Bad Domain"}, "policy.trustDomain", "trust domain"),
        ({"namespace": 3}, "policy.namespace", "expected a non-empty string"),
        ({"policies": {"a": 1}}, "policy.policies", "expected a list"),
        ({"policies": [{}, "x"]}, "policy.policies[1]", "expected an object"),
        (_with_policy(ports=[80, 0]), "policy.policies[1].ports[1]", "(1-65535)"),
        (_with_policy(ports=[True]), "policy.policies[1].ports[0]", "not a port number"),
        (_with_policy(allow=[{"regex": ".*"}]), "policy.policies[1].allow[0]", "unknown key"),
        (
            _with_policy(allow=[{"exact": "spiffe://a.org/x", "prefix": "spiffe://a.org"}]),
            "policy.policies[1].allow[0]",
            "exactly one of exact",
        ),
        (
            _with_policy(allow=[{"exact": "http://a.org/x"}]),
            "policy.policies[1].allow[0].exact",
            "scheme",
        ),
        (
            _with_policy(selector={"matchLabels": {"-app": "x"}}),
            "policy.policies[1].selector.matchLabels",
            "not a valid label key",
        ),
        (_with_policy(mtls="permissive"), "policy.policies[1].mtls", "STRICT or PERMISSIVE"),
        (_with_policy(mtls=True), "policy.policies[1].mtls", "STRICT or PERMISSIVE"),
    ],
)  # fmt: skip
def test_a_bad_document_is_refused_naming_its_json_path(
    document: Any, field: str, words: str
) -> None:
    with pytest.raises(FieldError) as caught:
        parse_policy_document(document)
    assert caught.value.field == field
    assert words in caught.value.reason
    assert str(caught.value) == f"{field}: {caught.value.reason}"
    assert field not in caught.value.reason  # the path once, not repeated inside the reason


def test_every_path_starts_at_the_root_the_reader_names() -> None:
    with pytest.raises(FieldError) as caught:
        parse_policy_document(_with_policy(ports=["80"]), "policy.json")
    assert caught.value.field == "policy.json.policies[1].ports[0]"
