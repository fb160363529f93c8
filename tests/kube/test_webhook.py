"""The sidecar-injection webhook as the API server calls it.

The MutatingWebhookConfiguration comes from manifests/ (selectors, failurePolicy,
reinvocationPolicy as shipped); only its clientConfig is turned into a ``url:`` naming a
replica on loopback (controlplane.py says why). The caBundle is the one the operator
manages, so the API server checks the operator's own certificate. Pods are created with
the API and read back as stored: what the webhook returned is what etcd holds.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from mesh_operator.injection import ANNOTATION_STATUS, INIT_NAME, SIDECAR_NAME

from .conftest import WEBHOOK_HOST, Operators, create_namespace, point_webhooks_at
from .controlplane import ControlPlane


def _namespace(plane: ControlPlane, *, labelled: bool) -> str:
    name = f"inject-{uuid.uuid4().hex[:8]}"
    create_namespace(plane, name, {"trellis.dev/inject": "enabled"} if labelled else None)
    return name


def _pod(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/app:1",
                    "ports": [{"containerPort": 8080}],
                }
            ],
            **spec,
        },
    }


def _create(plane: ControlPlane, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
    plane.kubectl_ok("-n", namespace, "create", "-f", "-", stdin=json.dumps(pod))
    return plane.get("-n", namespace, "pod", pod["metadata"]["name"])


def _names(pod: dict[str, Any], key: str) -> list[str]:
    return [c["name"] for c in pod["spec"].get(key) or []]


def test_pod_in_a_labelled_namespace_is_stored_with_the_sidecar(operators: Operators) -> None:
    plane = operators.plane
    namespace = _namespace(plane, labelled=True)
    stored = _create(plane, namespace, _pod("web"))
    assert _names(stored, "initContainers") == [INIT_NAME, SIDECAR_NAME]
    sidecar = stored["spec"]["initContainers"][1]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar, accepted by this release
    assert ANNOTATION_STATUS in stored["metadata"]["annotations"]
    assert _names(stored, "containers") == ["app"]


def test_pod_in_an_unlabelled_namespace_is_stored_unchanged(operators: Operators) -> None:
    plane = operators.plane
    stored = _create(plane, _namespace(plane, labelled=False), _pod("web"))
    assert _names(stored, "initContainers") == []
    assert ANNOTATION_STATUS not in (stored["metadata"].get("annotations") or {})


def test_opted_out_pod_in_a_labelled_namespace_is_stored_unchanged(operators: Operators) -> None:
    plane = operators.plane
    namespace = _namespace(plane, labelled=True)
    by_annotation = _pod("by-annotation")
    by_annotation["metadata"]["annotations"] = {"trellis.dev/inject": "false"}
    by_label = _pod("by-label")
    by_label["metadata"]["labels"]["trellis.dev/inject"] = "disabled"
    for pod in (by_annotation, by_label):
        stored = _create(plane, namespace, pod)
        assert _names(stored, "initContainers") == [], pod["metadata"]["name"]


def test_host_network_pod_in_a_labelled_namespace_is_stored_unchanged(operators: Operators) -> None:
    plane = operators.plane
    stored = _create(plane, _namespace(plane, labelled=True), _pod("node-agent", hostNetwork=True))
    assert _names(stored, "initContainers") == []
    assert stored["spec"]["hostNetwork"] is True


def test_a_pod_applied_twice_or_resubmitted_injected_has_one_sidecar(operators: Operators) -> None:
    plane = operators.plane
    namespace = _namespace(plane, labelled=True)
    manifest = json.dumps(_pod("web"))
    for _ in range(2):
        plane.kubectl_ok("-n", namespace, "apply", "-f", "-", stdin=manifest)
    stored = plane.get("-n", namespace, "pod", "web")
    assert _names(stored, "initContainers") == [INIT_NAME, SIDECAR_NAME]

    # The stored (injected) spec submitted as a new Pod: the webhook sees its own work.
    again = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-again",
            "labels": stored["metadata"]["labels"],
            "annotations": stored["metadata"]["annotations"],
        },
        "spec": {k: v for k, v in stored["spec"].items() if k != "nodeName"},
    }
    resubmitted = _create(plane, namespace, again)
    assert _names(resubmitted, "initContainers") == [INIT_NAME, SIDECAR_NAME]


def test_webhook_down_with_failure_policy_fail_refuses_the_pod_clearly(
    operators: Operators,
) -> None:
    plane = operators.plane
    namespace = _namespace(plane, labelled=True)
    closed = f"https://{WEBHOOK_HOST}:1"  # nothing listens on port 1
    point_webhooks_at(plane, closed)
    try:
        refused = plane.kubectl("-n", namespace, "create", "-f", "-", stdin=json.dumps(_pod("web")))
    finally:
        point_webhooks_at(plane, f"https://{WEBHOOK_HOST}:{operators.replicas[0].port}")
    assert refused.returncode != 0
    assert 'failed calling webhook "namespace.inject.trellis.dev"' in refused.stderr, refused.stderr
    assert "connection refused" in refused.stderr, refused.stderr
    assert plane.kubectl("-n", namespace, "get", "pod", "web").returncode != 0
