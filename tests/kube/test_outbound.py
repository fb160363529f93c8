"""Traffic to the world outside the mesh, from the API server's side: the webhook refuses a
pod whose redirect annotations are malformed (one line in kubectl's error), and the
operator's watches turn an injected pod and the Service selecting it into the ``mesh``
section of the namespace's policy document, with no AccessPolicy there.

No kubelet runs: the pod's ``nodeName`` is set as the scheduler would, and its ``podIP``
is written through the status subresource as the kubelet would.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tests.support import wait_for

from .conftest import Operators, create_namespace
from .controlplane import ControlPlane

POD_IP = "10.244.7.9"  # a stored value only: nothing is ever sent to it


def _pod(name: str, annotations: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}], **spec},
    }


def _namespace(plane: ControlPlane) -> str:
    name = f"outbound-{uuid.uuid4().hex[:8]}"
    create_namespace(plane, name, {"trellis.dev/inject": "enabled"})
    return name


def test_a_pod_with_a_malformed_redirect_annotation_is_refused_in_one_line(
    operators: Operators,
) -> None:
    plane = operators.plane
    namespace = _namespace(plane)
    bad = _pod("web", {"trellis.dev/exclude-outbound-ip-ranges": "10.0.0.1/8"})
    refused = plane.kubectl("-n", namespace, "create", "-f", "-", stdin=json.dumps(bad))
    assert refused.returncode != 0
    assert "trellis.dev/exclude-outbound-ip-ranges: '10.0.0.1/8' is not a CIDR" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert plane.kubectl("-n", namespace, "get", "pod", "web").returncode != 0


def test_an_injected_pod_and_its_service_are_published_as_the_mesh(
    operators: Operators,
) -> None:
    plane = operators.plane
    namespace = _namespace(plane)
    pod = _pod(
        "ledger", {"trellis.dev/exclude-outbound-ip-ranges": "169.254.169.254/32"},
        nodeName="node-a",
    )  # fmt: skip
    plane.kubectl_ok("-n", namespace, "create", "-f", "-", stdin=json.dumps(pod))
    stored = plane.get("-n", namespace, "pod", "ledger")
    init = next(c for c in stored["spec"]["initContainers"] if c["name"] == "trellis-init")
    assert "--exclude-outbound-ip-ranges=169.254.169.254/32" in init["args"]
    status = {"status": {"phase": "Running", "podIP": POD_IP, "podIPs": [{"ip": POD_IP}]}}
    plane.kubectl_ok(
        "-n", namespace, "patch", "pod", "ledger", "--subresource=status", "--type=merge",
        "-p", json.dumps(status),
    )  # fmt: skip
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "ledger"},
        "spec": {"selector": {"app": "ledger"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    plane.kubectl_ok("-n", namespace, "create", "-f", "-", stdin=json.dumps(service))
    cluster_ip = plane.get("-n", namespace, "service", "ledger")["spec"]["clusterIP"]

    def mesh() -> dict[str, Any] | None:
        result = plane.kubectl("-n", namespace, "get", "configmap", "trellis-policy", "-o", "json")
        if result.returncode != 0:
            return None
        document = json.loads(json.loads(result.stdout)["data"]["policy.json"])
        section = document.get("mesh")
        return section if isinstance(section, dict) else None

    def published() -> bool:
        section = mesh()
        return section is not None and f"{cluster_ip}/32" in section["destinations"]

    wait_for(published, 60, "the pod and its Service in the namespace's mesh registry")
    section = mesh()
    assert section is not None
    assert section["outboundTrafficPolicy"] == "ALLOW_ANY"
    assert f"{POD_IP}/32" in section["destinations"]
