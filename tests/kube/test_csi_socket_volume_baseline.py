"""The Workload API socket volume under Pod Security "baseline", in the real API server.

The Pod is the injector's output (``plan_injection`` in the CNI redirect mode, so no
NET_ADMIN init container is in the way) applied as the API server applies a JSONPatch, then
created with ``--dry-run=server``: validated and admitted in full by the API server's own
PodSecurity admission, never stored. Baseline refuses any ``hostPath`` volume and admits
``csi`` ones, so the agent socket reaches the pod through csi.trellis.dev.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import jsonpatch

from mesh_operator.injection import InjectorConfig, plan_injection

from .conftest import create_namespace
from .controlplane import ControlPlane

ENFORCE_BASELINE = {"pod-security.kubernetes.io/enforce": "baseline"}


def _injected(config: InjectorConfig) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"web-{uuid.uuid4().hex[:6]}", "labels": {"app": "web"}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/app:1",
                    "ports": [{"containerPort": 8080}],
                }
            ]
        },
    }
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, list(plan_injection(pod, config).patch))
    return patched


def _admit(cluster: ControlPlane, pod: dict[str, Any]) -> Any:
    namespace = f"csi-{uuid.uuid4().hex[:8]}"
    create_namespace(cluster, namespace, ENFORCE_BASELINE)
    return cluster.kubectl(
        "-n", namespace, "create", "--dry-run=server", "-f", "-", stdin=json.dumps(pod)
    )


def test_the_injected_pod_with_the_csi_socket_volume_is_admitted_under_baseline(
    cluster: ControlPlane,
) -> None:
    result = _admit(cluster, _injected(InjectorConfig(redirect="cni")))
    assert result.returncode == 0, result.stderr


def test_the_same_pod_with_a_host_path_socket_volume_is_refused_under_baseline(
    cluster: ControlPlane,
) -> None:
    result = _admit(
        cluster, _injected(InjectorConfig(redirect="cni", agent_socket_csi_driver=None))
    )
    assert result.returncode != 0
    assert 'violates PodSecurity "baseline:latest"' in result.stderr, result.stderr
    assert "hostPath volumes" in result.stderr, result.stderr
