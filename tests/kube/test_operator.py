"""The operator's reconcilers against real watches, resourceVersions and finalizers.

Two ``trellis operator run`` replicas run as the ``trellis-operator`` ServiceAccount. A
``ClusterWorkloadIdentity`` and a Pod stored on a node (no kubelet runs it; ``nodeName``
is set as the scheduler would) become an entry in the ConfigMap the CA server reads;
deleting the identity is held by the operator's finalizer until the entry is gone.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import yaml

from ca.entries import parse_entries_yaml
from ca.server.bans import parse_ban_list
from mesh_operator.bans import BAN_LABEL
from mesh_operator.handlers import FINALIZER
from tests.support import wait_for

from .conftest import NAMESPACE, WEBHOOK_HOST, Operators, create_namespace, point_webhooks_at
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


def _config_map(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any] | None:
    result = plane.kubectl("-n", namespace, "get", "configmap", name, "-o", "json")
    if result.returncode != 0:
        return None
    value = json.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def _ready(plane: ControlPlane, *what: str) -> dict[str, Any] | None:
    for condition in plane.get(*what).get("status", {}).get("conditions", []):
        if condition["type"] == "Ready":
            assert isinstance(condition, dict)
            return condition
    return None


def test_access_policy_becomes_the_namespaces_sidecar_policy_document(
    operators: Operators,
) -> None:
    plane = operators.plane
    namespace = f"shop-{uuid.uuid4().hex[:6]}"
    create_namespace(plane, namespace)
    policy = {
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "AccessPolicy",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "mtls": "PERMISSIVE",
            "allow": [{"exact": f"spiffe://example.org/ns/{namespace}/sa/api"}],
        },
    }
    plane.kubectl_ok("create", "-f", "-", stdin=json.dumps(policy))
    wait_for(
        lambda: _config_map(plane, namespace, "trellis-policy") is not None,
        60,
        "the namespace's policy ConfigMap",
    )
    document = json.loads(_config_map(plane, namespace, "trellis-policy")["data"]["policy.json"])  # type: ignore[index]
    assert f"spiffe://example.org/ns/{namespace}/sa/api" in json.dumps(document)
    assert [p.get("mtls") for p in document["policies"]] == ["PERMISSIVE"]
    wait_for(lambda: _ready(plane, "-n", namespace, "ap", "web") is not None, 60, "its status")


def test_federated_trust_domain_becomes_the_cas_federation_document(
    operators: Operators,
) -> None:
    plane = operators.plane
    domain = f"partner-{uuid.uuid4().hex[:6]}.example"
    federation = {
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "FederatedTrustDomain",
        "metadata": {"name": domain.split(".")[0]},
        "spec": {
            "trustDomain": domain,
            "bundleEndpointURL": f"https://bundle.{domain}/",
            "bundleEndpointSPIFFEID": f"spiffe://{domain}/bundle",
            "bootstrapBundle": plane.ca_file.read_text(),
        },
    }
    plane.kubectl_ok("create", "-f", "-", stdin=json.dumps(federation))

    def listed() -> bool:
        found = _config_map(plane, NAMESPACE, "trellis-federation")
        text = (found or {}).get("data", {}).get("federation.json", "{}")
        return domain in [d["trustDomain"] for d in json.loads(text).get("trustDomains", [])]

    wait_for(listed, 60, f"{domain} in the federation ConfigMap")


def test_identity_the_schema_accepts_but_the_operator_cannot_use_is_refused_in_words(
    operators: Operators,
) -> None:
    """72h matches the CRD's duration pattern; the 24 h limit is the operator's. Its
    validating webhook refuses it through kubectl; with the webhook unreachable
    (failurePolicy Ignore) the object is stored and its status says what is wrong."""
    plane = operators.plane
    name = f"broken-{uuid.uuid4().hex[:6]}"
    broken = json.dumps(
        {
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "ClusterWorkloadIdentity",
            "metadata": {"name": name},
            "spec": {"ttl": "72h", "podSelector": {"matchLabels": {"app": name}}},
        }
    )
    refused = plane.kubectl("create", "-f", "-", stdin=broken)
    assert refused.returncode != 0
    assert 'admission webhook "validate.trellis.dev" denied the request' in refused.stderr
    # The limit in the CRD's own duration syntax, not Python's timedelta ("1 day, 0:00:00").
    assert "spec.ttl: 72h is longer than the maximum of 24h" in refused.stderr, refused.stderr

    point_webhooks_at(plane, f"https://{WEBHOOK_HOST}:1")  # nothing listens on port 1
    try:
        plane.kubectl_ok("create", "-f", "-", stdin=broken)
    finally:
        point_webhooks_at(plane, f"https://{WEBHOOK_HOST}:{operators.replicas[0].port}")
    wait_for(lambda: _ready(plane, "cwi", name) is not None, 60, f"{name}'s status")
    condition = _ready(plane, "cwi", name)
    assert condition is not None
    assert condition["status"] == "False"
    assert condition["reason"] == "InvalidSpec" and "spec.ttl" in condition["message"]


def test_both_webhook_configurations_trust_the_certificate_in_the_secret(
    operators: Operators,
) -> None:
    plane = operators.plane
    secret = plane.get("-n", NAMESPACE, "secret", "trellis-webhook-tls")
    bundle = base64.b64decode(secret["data"]["ca.crt"])
    for kind, name in (
        ("mutatingwebhookconfiguration", "trellis-sidecar-injector"),
        ("validatingwebhookconfiguration", "trellis-validator"),
    ):
        hooks = plane.get(kind, name)["webhooks"]
        assert {base64.b64decode(h["clientConfig"]["caBundle"]) for h in hooks} == {bundle}


def test_node_labels_ban_and_unban_agents_through_the_cas_ban_list(operators: Operators) -> None:
    plane = operators.plane
    suffix = uuid.uuid4().hex[:6]
    first, second = f"ban-a-{suffix}", f"ban-b-{suffix}"

    def banned() -> frozenset[str]:
        found = _config_map(plane, NAMESPACE, "trellis-banned-agents") or {}
        if not (found.get("metadata", {}).get("labels") or {}).get("app.kubernetes.io/managed-by"):
            return frozenset()
        return parse_ban_list(found["data"]["banned.yaml"]) & {first, second}

    def node(name: str, value: str | None) -> None:
        labels = {BAN_LABEL: value} if value is not None else {}
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
        plane.kubectl_ok("apply", "-f", "-", stdin=json.dumps(body))

    node(first, "true")
    node(second, None)
    wait_for(lambda: banned() == {first}, 60, f"{first} banned")
    node(second, "true")
    wait_for(lambda: banned() == {first, second}, 60, f"{second} banned")
    node(first, "false")
    wait_for(lambda: banned() == {second}, 60, f"{first} unbanned")
    plane.kubectl_ok("delete", "node", second)
    wait_for(lambda: banned() == frozenset(), 60, f"{second} gone from the list")

    # Nodes are only read: the operator's ClusterRole grants no write on them.
    can = plane.kubectl(
        "auth", "can-i", "patch", "nodes",
        f"--as=system:serviceaccount:{NAMESPACE}:trellis-operator",
    )  # fmt: skip
    assert can.stdout.strip() == "no", can.stdout + can.stderr


def test_an_identity_stored_while_the_validator_was_down_can_still_be_labelled_and_deleted(
    operators: Operators,
) -> None:
    """failurePolicy Ignore lets an invalid object in while the operator is away. Once the
    validator is back, metadata-only updates (a label, kopf removing its finalizer) must
    still pass, or the object could never be deleted."""
    plane = operators.plane
    name = f"stored-{uuid.uuid4().hex[:6]}"
    broken = {
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "ClusterWorkloadIdentity",
        "metadata": {"name": name},
        "spec": {"ttl": "72h", "podSelector": {"matchLabels": {"app": name}}},
    }
    point_webhooks_at(plane, f"https://{WEBHOOK_HOST}:1")  # nothing listens on port 1
    try:
        plane.kubectl_ok("create", "-f", "-", stdin=json.dumps(broken))
        wait_for(
            lambda: FINALIZER in plane.get("cwi", name)["metadata"].get("finalizers", []),
            60,
            f"{name}'s finalizer",
        )
    finally:
        point_webhooks_at(plane, f"https://{WEBHOOK_HOST}:{operators.replicas[0].port}")

    labelled = plane.kubectl("label", "cwi", name, "team=payments")
    assert labelled.returncode == 0, labelled.stderr
    # A spec change is still checked.
    edited = plane.kubectl("patch", "cwi", name, "--type=merge", "-p", '{"spec":{"ttl":"48h"}}')
    assert edited.returncode != 0
    assert "spec.ttl: 48h is longer than the maximum" in edited.stderr, edited.stderr

    plane.kubectl_ok("delete", "cwi", name, "--wait=false")
    wait_for(
        lambda: plane.kubectl("get", "cwi", name).returncode != 0,
        60,
        f"{name} to be deleted once the operator releases its finalizer",
    )
