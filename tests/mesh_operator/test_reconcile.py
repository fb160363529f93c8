"""Reconcilers as pure functions: snapshots in, entries, policies and conditions out."""

from __future__ import annotations

import datetime as dt
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from ca import RootAuthority
from ca.entries import Selector, parse_entries_yaml
from ca.spiffeid import SpiffeId, TrustDomain
from mesh_operator.reconcile import (
    ClusterSnapshot,
    PodView,
    compile_policies,
    entries_document,
    reconcile_federation,
    reconcile_identities,
)


def _partner_root_pem() -> str:
    root = RootAuthority.create(TrustDomain("partner.example"), now=dt.datetime.now(dt.UTC))
    return root.certificate.public_bytes(serialization.Encoding.PEM).decode()


PARTNER_ROOT_PEM = _partner_root_pem()


TD = TrustDomain("example.org")


def pod(
    name: str,
    namespace: str = "shop",
    *,
    sa: str = "web",
    node: str | None = "node-a",
    phase: str = "Running",
    **labels: str,
) -> PodView:
    return PodView(namespace, name, sa, node, labels, phase)


def cwi(name: str, generation: int = 1, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "generation": generation}, "spec": spec}


def snapshot(*pods: PodView, templates: dict[str, Any] | None = None, **kw: Any) -> ClusterSnapshot:
    return ClusterSnapshot(
        trust_domain=TD,
        templates=templates or {},
        pods={p.key: p for p in pods},
        namespaces=kw.pop("namespaces", {"shop": {"mesh": "on"}, "other": {}}),
        **kw,
    )


def conditions(status: Any) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in status.conditions}


def test_replicas_of_one_workload_share_one_entry_scoped_to_their_nodes() -> None:
    result = reconcile_identities(
        snapshot(
            pod("web-1", app="web"),
            pod("web-2", node="node-b", app="web"),
            pod("web-3", node=None, app="web"),  # not scheduled: no agent can ask yet
            pod("web-4", phase="Succeeded", app="web"),
            templates={
                "default": cwi("default", namespaceSelector={"matchLabels": {"mesh": "on"}})
            },
        )
    )
    (entry,) = result.entries
    assert entry.spiffe_id == SpiffeId("spiffe://example.org/ns/shop/sa/web")
    assert entry.selectors == {Selector("k8s", "ns", "shop"), Selector("k8s", "sa", "web")}
    assert entry.nodes == {"node-a", "node-b"}
    status = result.statuses["default"]
    assert status.ready and status.fields == {"selectedPods": 2, "entries": 1}
    assert conditions(status)["Ready"][1] == "EntriesPublished"


def test_pod_selector_labels_become_selectors_the_agent_attests() -> None:
    result = reconcile_identities(
        snapshot(
            pod("api-1", app="api", tier="backend"),
            pod("web-1", app="web"),
            templates={
                "apps": cwi(
                    "apps",
                    spiffeIDTemplate="spiffe://{trustDomain}/app/{podLabel:app}",
                    podSelector={"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
                    dnsNameTemplates=["{podLabel:app}.{namespace}.svc"],
                    ttl="30m",
                )
            },
        )
    )
    (entry,) = result.entries
    assert str(entry.spiffe_id) == "spiffe://example.org/app/api"
    assert Selector("k8s", "pod-label", "tier:backend") in entry.selectors
    assert Selector("k8s", "pod-label", "app:api") in entry.selectors
    assert entry.dns_names == ("api.shop.svc",)
    assert entry.x509_svid_ttl.total_seconds() == 1800


def test_node_name_in_the_template_pins_each_entry_to_its_node() -> None:
    result = reconcile_identities(
        snapshot(
            pod("a", app="x"),
            pod("b", node="node-b", app="x"),
            templates={"n": cwi("n", spiffeIDTemplate="spiffe://{trustDomain}/node/{nodeName}")},
        )
    )
    by_id = {str(e.spiffe_id): e for e in result.entries}
    assert (
        Selector("k8s", "node-name", "node-b")
        in by_id["spiffe://example.org/node/node-b"].selectors
    )
    assert by_id["spiffe://example.org/node/node-a"].nodes == {"node-a"}


def test_the_entries_document_is_what_the_ca_server_parses() -> None:
    result = reconcile_identities(
        snapshot(pod("web-1", app="web"), templates={"default": cwi("default")})
    )
    text = yaml.safe_dump(entries_document(result.entries))
    parsed = parse_entries_yaml(text, trust_domain=TD)
    assert parsed.revision == result.entries.revision


def test_a_templates_hint_reaches_the_entries_document_the_ca_server_parses() -> None:
    result = reconcile_identities(
        snapshot(
            pod("web-1", app="web"),
            pod("web-2", node="node-b", app="web"),
            templates={"default": cwi("default", hint="internal: east")},
        )
    )
    document = entries_document(result.entries)
    assert [e["hint"] for e in document["entries"]] == ["internal: east"]
    (entry,) = parse_entries_yaml(yaml.safe_dump(document), trust_domain=TD)
    assert entry.hint == "internal: east"
    assert entry.nodes == {"node-a", "node-b"}


def test_a_template_without_a_hint_writes_no_hint_field() -> None:
    result = reconcile_identities(
        snapshot(pod("web-1", app="web"), templates={"default": cwi("default")})
    )
    (raw,) = entries_document(result.entries)["entries"]
    assert "hint" not in raw
    (entry,) = parse_entries_yaml(yaml.safe_dump({"entries": [raw]}), trust_domain=TD)
    assert entry.hint == ""


def test_a_bad_hint_reports_the_field_and_issues_nothing() -> None:
    result = reconcile_identities(
        snapshot(
            pod("web-1", app="web"),
            templates={"bad": cwi("bad", generation=2, hint="bell\a")},
        )
    )
    assert len(result.entries) == 0
    state, reason, message = conditions(result.statuses["bad"])["Valid"]
    assert (state, reason) == ("False", "InvalidSpec")
    assert message.startswith("spec.hint: ") and "must be printable" in message


def test_a_bad_template_reports_the_field_and_issues_nothing() -> None:
    result = reconcile_identities(
        snapshot(pod("web-1"), templates={"bad": cwi("bad", generation=7, ttl="48h")})
    )
    assert len(result.entries) == 0
    status = result.statuses["bad"]
    assert not status.ready and status.generation == 7
    state, reason, message = conditions(status)["Valid"]
    assert (state, reason) == ("False", "InvalidSpec")
    assert "spec.ttl" in message and "Fix the field" in message


def test_a_selector_matching_nothing_says_so_in_words() -> None:
    result = reconcile_identities(
        snapshot(
            pod("web-1", app="web"),
            templates={"t": cwi("t", podSelector={"matchLabels": {"app": "wbe"}})},
        )
    )
    state, reason, message = conditions(result.statuses["t"])["PodsSelected"]
    assert (state, reason) == ("False", "NoPodsSelected")
    assert "app in (wbe)" in message and "Check the pods' labels" in message


def test_two_templates_selecting_one_pod_are_both_told_about_the_overlap() -> None:
    result = reconcile_identities(
        snapshot(
            pod("web-1", app="web"),
            templates={
                "by-sa": cwi("by-sa"),
                "by-app": cwi(
                    "by-app",
                    spiffeIDTemplate="spiffe://{trustDomain}/app/{podLabel:app}",
                    podSelector={"matchLabels": {"app": "web"}},
                ),
            },
        )
    )
    assert len(result.entries) == 2
    for name, other in (("by-sa", "by-app"), ("by-app", "by-sa")):
        state, reason, message = conditions(result.statuses[name])["Overlapping"]
        assert (state, reason) == ("True", "OverlappingEntries")
        assert f"also selected by ClusterWorkloadIdentity {other}" in message
        assert "receives 2 identities" in message


def test_the_same_entry_with_different_settings_keeps_the_first_templates() -> None:
    result = reconcile_identities(
        snapshot(
            pod("web-1"),
            templates={"a": cwi("a", ttl="1h"), "b": cwi("b", ttl="2h")},
        )
    )
    (entry,) = result.entries
    assert entry.x509_svid_ttl.total_seconds() == 3600
    assert "a's settings win" in conditions(result.statuses["b"])["Overlapping"][2]


def test_the_same_entry_with_a_different_hint_keeps_the_first_templates() -> None:
    result = reconcile_identities(
        snapshot(
            pod("web-1"),
            templates={"a": cwi("a", hint="internal"), "b": cwi("b", hint="external")},
        )
    )
    (entry,) = result.entries
    assert entry.hint == "internal"
    assert "a's settings win" in conditions(result.statuses["b"])["Overlapping"][2]


def test_a_pod_missing_a_template_label_is_reported_not_guessed() -> None:
    result = reconcile_identities(
        snapshot(
            pod("web-1"),
            templates={"t": cwi("t", spiffeIDTemplate="spiffe://{trustDomain}/app/{podLabel:app}")},
        )
    )
    assert len(result.entries) == 0
    state, reason, message = conditions(result.statuses["t"])["Ready"]
    assert (state, reason) == ("False", "RenderFailed")
    assert "shop/web-1 has no label 'app'" in message


def test_federation_names_must_resolve_to_a_federated_trust_domain() -> None:
    fed = {
        "metadata": {"name": "partner"},
        "spec": {
            "trustDomain": "partner.example",
            "bundleEndpointURL": "https://b.partner.example",
            "bundleEndpointSPIFFEID": "spiffe://partner.example/ca",
            "bootstrapBundle": PARTNER_ROOT_PEM,
        },
    }
    templates = {"t": cwi("t", federatesWith=["partner.example", "ghost.example"])}
    result = reconcile_identities(
        snapshot(pod("web-1"), templates=templates, federations={"partner": fed})
    )
    state, reason, message = conditions(result.statuses["t"])["FederationResolved"]
    assert (state, reason) == ("False", "UnknownTrustDomain")
    assert "ghost.example" in message and "partner.example" not in message
    (entry,) = result.entries
    assert [t.name for t in entry.federates_with] == ["partner.example", "ghost.example"]
    specs, statuses = reconcile_federation(
        snapshot(federations={"partner": fed, "dup": {**fed, "metadata": {"name": "dup"}}})
    )
    assert [s.trust_domain.name for s in specs] == ["partner.example"]
    # the first by name wins; the other is told which one to delete
    assert conditions(statuses["dup"])["Ready"][0] == "True"
    state, reason, message = conditions(statuses["partner"])["Ready"]
    assert (state, reason) == ("False", "Duplicate")
    assert "FederatedTrustDomain dup already defines partner.example" in message


def test_policies_compile_into_one_document_per_namespace() -> None:
    policies = {
        "shop/ledger": {
            "metadata": {"name": "ledger", "namespace": "shop", "generation": 2},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "ports": [8080],
                "mtls": "PERMISSIVE",
                "allow": [{"prefix": "spiffe://example.org/ns/front"}],
            },
        },
        "shop/closed": {"metadata": {"name": "closed", "namespace": "shop"}, "spec": {}},
        "other/bad": {
            "metadata": {"name": "bad", "namespace": "other"},
            "spec": {"mtls": "OFF"},
        },
    }
    result = compile_policies(snapshot(pod("web-1", app="web"), policies=policies))
    assert set(result.documents) == {"shop"}
    document = result.documents["shop"]
    assert [p["name"] for p in document["policies"]] == ["closed", "ledger"]
    ledger = document["policies"][1]
    assert ledger["allow"] == [{"prefix": "spiffe://example.org/ns/front"}]
    assert ledger["mtls"] == "PERMISSIVE"  # the mode reaches the sidecars' document
    assert "mtls" not in document["policies"][0]  # unset stays unset (strict by default)
    assert ledger["selector"] == {
        "matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]
    }
    assert conditions(result.statuses["shop/closed"])["Ready"][1] == "DenyAll"
    assert conditions(result.statuses["other/bad"])["Valid"][1] == "InvalidSpec"
    assert result.statuses["shop/ledger"].fields == {"selectedPods": 1}


def test_reconciling_twice_gives_identical_results() -> None:
    snap = snapshot(pod("web-1", app="web"), pod("web-2", app="web"), templates={"d": cwi("d")})
    first, second = reconcile_identities(snap), reconcile_identities(snap)
    assert first.entries.revision == second.entries.revision
    assert first.statuses == second.statuses


def test_the_federation_document_is_what_ca_serve_reads() -> None:
    from ca.server.federation import parse_federation
    from mesh_operator.reconcile import federation_document

    fed = {
        "metadata": {"name": "partner"},
        "spec": {
            "trustDomain": "partner.example",
            "bundleEndpointURL": "https://b.partner.example:8443/",
            "bundleEndpointSPIFFEID": "spiffe://partner.example/trellis/ca/east",
            "bootstrapBundle": PARTNER_ROOT_PEM,
        },
    }
    specs, _ = reconcile_federation(snapshot(federations={"partner": fed}))
    (rel,) = parse_federation(federation_document(specs), own=TD)
    assert rel.trust_domain == TrustDomain("partner.example")
    assert rel.bundle_endpoint_url == "https://b.partner.example:8443/"
    assert str(rel.bundle_endpoint_spiffe_id) == "spiffe://partner.example/trellis/ca/east"
    assert rel.bootstrap.to_pem().decode() == PARTNER_ROOT_PEM
