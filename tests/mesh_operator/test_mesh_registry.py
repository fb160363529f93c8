"""The mesh registry the operator publishes: injected pods' IPs and the ClusterIPs of
Services that select them go into every policy document's ``mesh`` section, and every
namespace with an injected pod gets a document, so its sidecars can tell the world
outside the mesh from the mesh. The reconcilers are pure functions of the snapshot; the
objects below are what the API server stores (the kopf watches hand them over as-is)."""

from __future__ import annotations

from typing import Any

from ca.spiffeid import TrustDomain
from mesh_operator.reconcile import ClusterSnapshot, PodView, ServiceView, compile_policies
from meshapi.policy import parse_policy_document

TD = TrustDomain("example.org")


def _pod(namespace: str, name: str, ip: str, *, injected: bool, app: str) -> PodView:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {"app": app}}
    if injected:
        meta["annotations"] = {"trellis.dev/injected": "0.1.0"}
    return PodView.from_object(
        {
            "metadata": meta,
            "spec": {"nodeName": "node-a"},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        }
    )


def _service(namespace: str, name: str, ip: str, selector: dict[str, str]) -> ServiceView:
    return ServiceView.from_object(
        {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": selector},
        }
    )


def _snapshot(policy: Any = "ALLOW_ANY") -> ClusterSnapshot:
    pods = [
        _pod("shop", "web-0", "10.244.1.7", injected=True, app="web"),
        _pod("shop", "legacy-0", "10.244.1.8", injected=False, app="legacy"),
        _pod("tools", "db-0", "10.244.2.9", injected=True, app="db"),
    ]
    services = [
        _service("shop", "web", "10.96.0.20", {"app": "web"}),
        _service("shop", "legacy", "10.96.0.21", {"app": "legacy"}),
        _service("shop", "external-db", "10.96.0.22", {}),  # endpoints kept by hand
        _service("tools", "web", "10.96.0.23", {"app": "web"}),  # no injected web there
    ]
    return ClusterSnapshot(
        trust_domain=TD,
        pods={p.key: p for p in pods},
        services={s.key: s for s in services},
        outbound_traffic_policy=policy,
    )


def test_injected_pods_and_the_services_selecting_them_are_the_mesh() -> None:
    documents = compile_policies(_snapshot()).documents
    # No AccessPolicy anywhere, yet both namespaces with injected pods get the registry.
    assert sorted(documents) == ["shop", "tools"]
    for document in documents.values():
        mesh = parse_policy_document(document).mesh
        assert mesh is not None and mesh.outbound_traffic_policy == "ALLOW_ANY"
        assert [str(n) for n in mesh.destinations] == [
            "10.96.0.20/32",
            "10.244.1.7/32",
            "10.244.2.9/32",
        ]
        assert not mesh.contains("10.244.1.8")  # not injected: outside the mesh
        assert not mesh.contains("10.96.0.22")  # a selector-less Service


def test_registry_only_is_published_as_set_and_off_publishes_nothing_new() -> None:
    documents = compile_policies(_snapshot("REGISTRY_ONLY")).documents
    assert {d["mesh"]["outboundTrafficPolicy"] for d in documents.values()} == {"REGISTRY_ONLY"}
    # Without the switch the documents are what they were: none without AccessPolicies.
    assert compile_policies(_snapshot(None)).documents == {}


def test_a_pod_leaving_the_mesh_leaves_the_registry() -> None:
    snapshot = _snapshot()
    pods = dict(snapshot.pods)
    pods["tools/db-0"] = _pod("tools", "db-0", "10.244.2.9", injected=False, app="db")
    documents = compile_policies(
        ClusterSnapshot(
            TD, pods=pods, services=snapshot.services, outbound_traffic_policy="ALLOW_ANY"
        )
    ).documents
    assert sorted(documents) == ["shop"]  # tools has no injected pod left
    assert "10.244.2.9/32" not in documents["shop"]["mesh"]["destinations"]
