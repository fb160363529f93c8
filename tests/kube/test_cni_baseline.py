"""Pod Security "baseline" and the CNI redirect mode, in the real API server.

The API server's own PodSecurity admission (on by default, run after the mutating webhooks)
judges the Pod as injected: a namespace labelled ``pod-security.kubernetes.io/enforce:
baseline`` refuses what baseline forbids, with a message naming each rule broken. The
webhook is the operator's, reached through the shipped MutatingWebhookConfiguration, whose
namespaceSelector picks ``/mutate/cni`` for namespaces labelled ``trellis.dev/redirect: cni``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from mesh_operator.injection import ANNOTATION_REDIRECT, INIT_NAME, SIDECAR_NAME
from tests.sidecar.test_cni import PREV_RESULT, netns  # noqa: F401 - netns is a fixture
from tests.sidecar.test_cni import _config as cni_config
from tests.sidecar.test_cni import _nat as nat_rules
from tests.sidecar.test_cni import _path as netns_path
from tests.sidecar.test_cni import _plugin as cni_plugin

from .conftest import Operators, create_namespace
from .controlplane import ControlPlane

INJECT = {"trellis.dev/inject": "enabled"}
CNI = {"trellis.dev/redirect": "cni"}
ENFORCE_BASELINE = {"pod-security.kubernetes.io/enforce": "baseline"}


def _namespace(plane: ControlPlane, *labels: dict[str, str]) -> str:
    name = f"psa-{uuid.uuid4().hex[:8]}"
    merged: dict[str, str] = {}
    for extra in labels:
        merged.update(extra)
    create_namespace(plane, name, merged)
    return name


def _pod(name: str) -> dict[str, Any]:
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
            ]
        },
    }


def _create(
    plane: ControlPlane, namespace: str, name: str, annotations: dict[str, str] | None = None
) -> Any:
    pod = _pod(name)
    if annotations:
        pod["metadata"]["annotations"] = annotations
    return plane.kubectl("-n", namespace, "create", "-f", "-", stdin=json.dumps(pod))


def test_todays_init_container_pod_is_refused_under_baseline_for_net_admin(
    operators: Operators,
) -> None:
    plane = operators.plane
    namespace = _namespace(plane, INJECT, ENFORCE_BASELINE)
    refused = _create(plane, namespace, "web")
    assert refused.returncode != 0
    assert 'violates PodSecurity "baseline:latest"' in refused.stderr, refused.stderr
    assert "non-default capabilities" in refused.stderr, refused.stderr
    assert f'container "{INIT_NAME}" must not include "NET_ADMIN", "NET_RAW"' in refused.stderr
    assert plane.kubectl("-n", namespace, "get", "pod", "web").returncode != 0


def test_a_cni_namespace_gets_the_sidecar_without_the_net_admin_init_container(
    operators: Operators,
) -> None:
    plane = operators.plane
    namespace = _namespace(plane, INJECT, CNI)
    assert _create(plane, namespace, "web").returncode == 0
    stored = plane.get("-n", namespace, "pod", "web")
    assert [c["name"] for c in stored["spec"]["initContainers"]] == [SIDECAR_NAME]
    # What the node's trellis-cni plugin reads to install the redirect for this pod.
    assert stored["metadata"]["annotations"][ANNOTATION_REDIRECT] == "cni"
    for container in [*stored["spec"]["initContainers"], *stored["spec"]["containers"]]:
        assert not (container.get("securityContext") or {}).get("capabilities", {}).get("add")


def test_the_cni_mode_pod_is_admitted_in_a_baseline_namespace(operators: Operators) -> None:
    plane = operators.plane
    namespace = _namespace(plane, INJECT, CNI, ENFORCE_BASELINE)
    admitted = _create(plane, namespace, "web")
    assert admitted.returncode == 0, admitted.stderr
    assert "PodSecurity" not in admitted.stderr, admitted.stderr  # not even a warning
    stored = plane.get("-n", namespace, "pod", "web")
    assert [c["name"] for c in stored["spec"]["initContainers"]] == [SIDECAR_NAME]
    # The agent socket arrives by the agent's CSI volume, which baseline allows; no hostPath.
    assert not any("hostPath" in volume for volume in stored["spec"]["volumes"])


def test_the_plugin_reads_the_stored_pod_and_redirects_only_the_cni_mode_one(
    operators: Operators,
    netns: str,  # noqa: F811 - the fixture imported above
) -> None:
    """The plugin as the runtime calls it (tests/sidecar/test_cni.py's harness), with the
    kubeconfig of the DaemonSet's ServiceAccount, so the shipped RBAC (get pods) is what
    lets it read the pod; the pod is the one the API server stored after injection."""
    plane = operators.plane
    kubeconfig = plane.service_account_kubeconfig("trellis-system", "trellis-cni")
    config = json.dumps(cni_config(redirectAll=False, kubeconfig=str(kubeconfig)))
    plain = _namespace(plane, INJECT)  # init-container mode: the plugin leaves it alone
    assert _create(plane, plain, "web").returncode == 0
    code, _ = cni_plugin(
        "ADD", config, netns_path=netns_path(netns),
        cni_args=f"K8S_POD_NAMESPACE={plain};K8S_POD_NAME=web",
    )  # fmt: skip
    assert code == 0 and "TRELLIS" not in nat_rules(netns)

    namespace = _namespace(plane, INJECT, CNI)
    assert _create(plane, namespace, "web").returncode == 0
    args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web"
    code, result = cni_plugin("ADD", config, netns_path=netns_path(netns), cni_args=args)
    assert (code, result) == (0, PREV_RESULT)
    assert "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in nat_rules(netns)
    assert cni_plugin("CHECK", config, netns_path=netns_path(netns), cni_args=args)[0] == 0

    # A pod the API server does not have: a CNI error, not a traceback.
    missing = f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=nobody"
    code, error = cni_plugin("ADD", config, netns_path=netns_path(netns), cni_args=missing)
    assert code != 0 and "nobody" in error["msg"]


def test_the_plugin_applies_the_pods_redirect_annotations_as_the_init_container_would(
    operators: Operators,
    netns: str,  # noqa: F811 - the fixture imported above
) -> None:
    """The exclusions a pod asks for (validated at admission) reach its netns in CNI mode
    too: an excluded range and inbound port return before the redirect, and an include
    list replaces the catch-all redirect."""
    plane = operators.plane
    kubeconfig = plane.service_account_kubeconfig("trellis-system", "trellis-cni")
    config = json.dumps(cni_config(redirectAll=False, kubeconfig=str(kubeconfig)))
    namespace = _namespace(plane, INJECT, CNI)
    annotations = {
        "trellis.dev/exclude-outbound-ip-ranges": "192.0.2.0/24",
        "trellis.dev/include-outbound-ip-ranges": "10.0.0.0/8,2001:db8::/32",
        "trellis.dev/exclude-inbound-ports": "9090",
    }
    assert _create(plane, namespace, "db", annotations).returncode == 0
    args = f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=db"
    code, result = cni_plugin("ADD", config, netns_path=netns_path(netns), cni_args=args)
    assert (code, result) == (0, PREV_RESULT)
    rules = nat_rules(netns)
    assert "-A TRELLIS_OUTPUT -d 192.0.2.0/24 -j RETURN" in rules
    assert "-A TRELLIS_OUTPUT -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 15001" in rules
    assert "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001" not in rules
    assert "--dport 9090 -j RETURN" in rules
    assert "2001:db8" not in rules  # the IPv6 range is ip6tables' alone
    assert cni_plugin("CHECK", config, netns_path=netns_path(netns), cni_args=args)[0] == 0
