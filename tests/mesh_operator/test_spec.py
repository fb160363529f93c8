"""The custom resources parsed at the edge: every rule a schema cannot express."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from ca import RootAuthority, TrustDomain
from ca.spiffeid import SpiffeId
from core.labels import LabelSelector
from mesh_operator.errors import SpecError
from mesh_operator.spec import (
    AllowedCaller,
    PodFacts,
    parse_access_policy,
    parse_federated_trust_domain,
    parse_identity_template,
)


def _partner_root_pem() -> str:
    root = RootAuthority.create(TrustDomain("partner.example"), now=dt.datetime.now(dt.UTC))
    return root.certificate.public_bytes(serialization.Encoding.PEM).decode()


PARTNER_ROOT_PEM = _partner_root_pem()


def template(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "t", "generation": 3}, "spec": spec}


def test_an_empty_template_gets_the_default_namespace_and_service_account_id() -> None:
    parsed = parse_identity_template(template())
    assert parsed.spiffe_id_template.fields == ("trustDomain", "namespace", "serviceAccount")
    assert parsed.x509_svid_ttl == dt.timedelta(hours=1)
    assert parsed.ref.generation == 3


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"ttl": "25h"}, "spec.ttl", "longer than the maximum"),
        ({"ttl": "30s"}, "spec.ttl", "shorter than one minute"),
        ({"ttl": "soon"}, "spec.ttl", "invalid duration"),
        (
            {"spiffeIDTemplate": "spiffe://{trustDomain}/{podName}"},
            "spec.spiffeIDTemplate",
            "cannot be attested",
        ),
        (
            {"spiffeIDTemplate": "spiffe://{trustDomain}/ns/{namespace"},
            "spec.spiffeIDTemplate",
            "unbalanced braces",
        ),
        (
            {"spiffeIDTemplate": "spiffe://other.org/{namespace}"},
            "spec.spiffeIDTemplate",
            "must start with spiffe://{trustDomain}/",
        ),
        (
            {"spiffeIDTemplate": "spiffe://{trustDomain}/a//b"},
            "spec.spiffeIDTemplate",
            "not a valid SPIFFE ID",
        ),
        (
            {"spiffeIDTemplate": "spiffe://{trustDomain}/trellis/agent"},
            "spec.spiffeIDTemplate",
            "reserved",
        ),
        (
            {
                "podSelector": {
                    "matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["x"]}]
                }
            },
            "spec.podSelector",
            "use In or Exists",
        ),
        (
            {"podSelector": {"matchLabels": {"app": "bad value!"}}},
            "spec.podSelector.matchLabels[app]",
            "not a valid label value",
        ),
        ({"dnsNameTemplates": ["{trustDomain}.svc"]}, "spec.dnsNameTemplates[0]", "not a DNS name"),
        ({"federatesWith": ["Not A Domain"]}, "spec.federatesWith[0]", ""),
        ({"hint": "x" * 129}, "spec.hint", "129 characters; at most 128"),
        ({"hint": "tab\there"}, "spec.hint", "must be printable"),
        ({"hint": "nul\x00"}, "spec.hint", "must be printable"),
        ({"hint": "line\u2028break"}, "spec.hint", "must be printable"),
        ({"hint": " internal"}, "spec.hint", "leading or trailing spaces"),
        ({"hint": "internal "}, "spec.hint", "leading or trailing spaces"),
        ({"hint": 7}, "spec.hint", "expected a string"),
        ({"hint": ["internal"]}, "spec.hint", "expected a string"),
    ],
)
def test_template_errors_name_the_field_and_the_fix(
    spec: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(SpecError) as caught:
        parse_identity_template(template(**spec))
    assert caught.value.field == field
    assert words in caught.value.reason


def test_a_hint_is_optional_and_kept_as_written_up_to_128_printable_characters() -> None:
    assert parse_identity_template(template()).hint == ""
    assert parse_identity_template(template(hint="")).hint == ""
    assert parse_identity_template(template(hint="internal")).hint == "internal"
    longest = "é" * 127 + "x"
    assert parse_identity_template(template(hint=longest)).hint == longest
    assert parse_identity_template(template(hint="east / blue")).hint == "east / blue"


def _crd_hint_schema() -> dict[str, Any]:
    path = Path(__file__).resolve().parents[2] / "manifests/crds/clusterworkloadidentities.yaml"
    crd = yaml.safe_load(path.read_text())
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema["properties"]["hint"]


@pytest.mark.parametrize(
    "hint",
    [
        "",
        "internal",
        "a b",
        "east / blue",
        "é" * 128,
        "x" * 129,
        " a",
        "a ",
        "a\tb",
        "a\x00",
        "\x85",
    ],
)
def test_the_crd_schema_and_the_parser_agree_on_a_hint(hint: str) -> None:
    try:
        jsonschema.validate(hint, _crd_hint_schema())
        schema_accepts = True
    except jsonschema.ValidationError:
        schema_accepts = False
    try:
        parse_identity_template(template(hint=hint))
        parser_accepts = True
    except SpecError:
        parser_accepts = False
    assert schema_accepts == parser_accepts


def test_a_label_placeholder_renders_from_the_pods_labels() -> None:
    parsed = parse_identity_template(
        template(spiffeIDTemplate="spiffe://{trustDomain}/app/{podLabel:app.kubernetes.io/name}")
    )
    assert parsed.spiffe_id_template.label_keys == ("app.kubernetes.io/name",)
    facts = PodFacts("example.org", "shop", "web", "node-1", {"app.kubernetes.io/name": "cart"})
    assert parsed.spiffe_id_template.render(facts) == "spiffe://example.org/app/cart"


def test_label_selectors_follow_the_api_servers_semantics() -> None:
    selector = LabelSelector.parse(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "NotIn", "values": ["x"]},
                {"key": "team", "operator": "Exists"},
            ],
        },
        "sel",
    )
    assert selector.matches({"app": "web", "tier": "a", "team": "t"})
    assert not selector.matches({"app": "web", "tier": "a", "team": "t", "canary": "1"})
    assert not selector.matches({"app": "web", "tier": "c", "team": "t"})
    assert not selector.matches({"app": "web", "tier": "a", "team": "t", "zone": "x"})
    assert LabelSelector.parse(None, "sel").matches({})
    with pytest.raises(SpecError, match="needs at least one value"):
        LabelSelector.parse({"matchExpressions": [{"key": "a", "operator": "In"}]}, "sel")


def policy(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "namespace": "shop"}, "spec": spec}


def test_a_policy_parses_exact_and_prefix_callers() -> None:
    parsed = parse_access_policy(
        policy(
            mtls="PERMISSIVE",
            ports=[8080, 8080, 443],
            allow=[{"exact": "spiffe://example.org/a"}, {"prefix": "spiffe://example.org/ns/web"}],
        )
    )
    assert parsed.ports == (443, 8080)
    assert parsed.mtls == "PERMISSIVE"
    assert parse_access_policy(policy()).mtls is None  # no opinion: strict unless another says
    assert parsed.allow[1] == AllowedCaller(SpiffeId("spiffe://example.org/ns/web"), True)


def test_a_prefix_allows_whole_path_segments_only() -> None:
    rule = AllowedCaller(SpiffeId("spiffe://example.org/ns/web"), prefix=True)
    assert rule.allows(SpiffeId("spiffe://example.org/ns/web"))
    assert rule.allows(SpiffeId("spiffe://example.org/ns/web/sa/x"))
    assert not rule.allows(SpiffeId("spiffe://example.org/ns/webhook"))
    assert not rule.allows(SpiffeId("spiffe://other.org/ns/web/sa/x"))


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"mtls": "DISABLE"}, "spec.mtls", "STRICT or PERMISSIVE"),
        ({"ports": [0]}, "spec.ports[0]", "not a port number"),
        (
            {"allow": [{"exact": "spiffe://a.org/x", "prefix": "spiffe://a.org/"}]},
            "spec.allow[0]",
            "exactly one",
        ),
        ({"allow": [{"exact": "http://a.org/x"}]}, "spec.allow[0].exact", "scheme"),
    ],
)
def test_policy_errors_name_the_field(spec: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_access_policy(policy(**spec))
    assert caught.value.field == field
    assert words in caught.value.reason


def test_a_federated_domain_must_serve_its_bundle_from_its_own_id_over_https() -> None:
    good = {
        "metadata": {"name": "partner"},
        "spec": {
            "trustDomain": "partner.example",
            "bundleEndpointURL": "https://bundle.partner.example",
            "bundleEndpointSPIFFEID": "spiffe://partner.example/ca",
            "bootstrapBundle": PARTNER_ROOT_PEM,
        },
    }
    assert parse_federated_trust_domain(good).trust_domain.name == "partner.example"
    plain = {**good, "spec": {**good["spec"], "bundleEndpointURL": "http://bundle.partner.example"}}
    with pytest.raises(SpecError, match="https"):
        parse_federated_trust_domain(plain)
    foreign = {**good, "spec": {**good["spec"], "bundleEndpointSPIFFEID": "spiffe://evil.org/ca"}}
    with pytest.raises(SpecError, match=r"not in partner\.example"):
        parse_federated_trust_domain(foreign)


def test_a_federated_domain_needs_a_readable_bootstrap_bundle_of_its_own_roots() -> None:
    spec = {
        "trustDomain": "partner.example",
        "bundleEndpointURL": "https://bundle.partner.example",
        "bundleEndpointSPIFFEID": "spiffe://partner.example/ca",
    }
    for bad in (None, "", "-----BEGIN CERTIFICATE-----\nnot base64\n", '{"keys": []}'):
        obj = {"metadata": {"name": "partner"}, "spec": {**spec, "bootstrapBundle": bad}}
        with pytest.raises(SpecError) as caught:
            parse_federated_trust_domain(obj)
        assert caught.value.field == "spec.bootstrapBundle"
    ok = {"metadata": {"name": "partner"}, "spec": {**spec, "bootstrapBundle": PARTNER_ROOT_PEM}}
    assert parse_federated_trust_domain(ok).bootstrap_bundle == PARTNER_ROOT_PEM
