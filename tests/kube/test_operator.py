"""The operator's reconcilers against real watches, resourceVersions and finalizers.

Two ``trellis operator run`` replicas run as the ``trellis-operator`` ServiceAccount. A
``ClusterWorkloadIdentity`` and a Pod stored on a node (no kubelet runs it; ``nodeName``
is set as the scheduler would) become an entry in the ConfigMap the CA server reads;
deleting the identity is held by the operator's finalizer until the entry is gone.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import yaml

from ca.entries import parse_entries_yaml
from mesh_operator.handlers import FINALIZER
from tests.support import wait_for

from .conftest import NAMESPACE, Operators, create_namespace
from .controlplane import ControlPlane

ENTRIES = "trellis-registration-entries"


def _entries(plane: ControlPlane) -> dict[str, Any]:
    result = plane.kubectl("-n", NAMESPACE, "get", "configmap", ENTRIES, "-o", "json")
    if result.returncode != 0:
        return {}
    text = json.loads(result.stdout).get("data", {}).get("entries.yaml", "")
    return {str(e.spiffe_id): e for e in parse_entries_yaml(text)} if text else {}


def _identity(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "ClusterWorkloadIdentity",
        "metadata": {"name": name},
        "spec": {
            "spiffeIDTemplate": "spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}",
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "podSelector": {"matchLabels": {"app": "ledger"}},
            "ttl": "10m",
        },
    }


def _scheduled_pod(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ledger-0", "namespace": namespace, "labels": {"app": "ledger"}},
        "spec": {
            "serviceAccountName": "ledger",
            "nodeName": "node-a",
            "containers": [{"name": "app", "image": "registry.example/ledger:1"}],
        },
    }


def test_identity_becomes_an_entry_and_deleting_it_waits_for_the_entry_to_go(
    operators: Operators,
) -> None:
    plane = operators.plane
    namespace = f"ledger-{uuid.uuid4().hex[:6]}"
    create_namespace(plane, namespace)
    plane.kubectl_ok("-n", namespace, "create", "serviceaccount", "ledger")
    plane.kubectl_ok("create", "-f", "-", stdin=json.dumps(_scheduled_pod(namespace)))
    name = f"ledger-{namespace}"
    plane.kubectl_ok("create", "-f", "-", stdin=json.dumps(_identity(name, namespace)))
    spiffe_id = f"spiffe://example.org/ns/{namespace}/sa/ledger"

    wait_for(lambda: spiffe_id in _entries(plane), 60, f"an entry for {spiffe_id}")
    entry = _entries(plane)[spiffe_id]
    assert {str(s) for s in entry.selectors} >= {f"k8s:ns:{namespace}", "k8s:sa:ledger"}
    assert "node-a" in entry.nodes
    stored = plane.get("cwi", name)
    assert FINALIZER in stored["metadata"]["finalizers"]

    def ready() -> bool:
        conditions = plane.get("cwi", name).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    wait_for(ready, 60, f"{name}'s Ready condition")

    plane.kubectl_ok("delete", "cwi", name, "--wait=false")
    wait_for(lambda: spiffe_id not in _entries(plane), 60, f"{spiffe_id}'s entry to go")
    wait_for(
        lambda: plane.kubectl("get", "cwi", name).returncode != 0,
        60,
        f"{name} to be deleted once its finalizer is released",
    )


def test_the_entries_config_map_is_labelled_as_the_operators_and_parses(
    operators: Operators,
) -> None:
    plane = operators.plane
    wait_for(
        lambda: plane.kubectl("-n", NAMESPACE, "get", "configmap", ENTRIES).returncode == 0,
        60,
        "the entries ConfigMap",
    )
    config_map = plane.get("-n", NAMESPACE, "configmap", ENTRIES)
    assert config_map["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "trellis-operator"
    document = yaml.safe_load(config_map["data"]["entries.yaml"]) or {}
    assert isinstance(document.get("entries", []), list)
