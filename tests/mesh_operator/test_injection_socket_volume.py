"""The injected pod reaches the Workload API through a CSI volume, never a hostPath.

Pod Security "baseline" refuses any ``hostPath`` volume and admits ``csi`` ones; the agent's
node plugin (``ca.agent.csi``, driver ``csi.trellis.dev``) publishes its socket directory
into the pod. The pod goes through ``plan_injection`` and the patch is applied as the API
server would (``jsonpatch``).
"""

from __future__ import annotations

from typing import Any

import jsonpatch

from ca.agent.csi import DRIVER_NAME
from mesh_operator.injection import SIDECAR_NAME, InjectorConfig, plan_injection

from .conftest import pod

SOCKET_VOLUME = "trellis-workload-api"


def _injected(config: InjectorConfig) -> dict[str, Any]:
    original = pod()
    patch = list(plan_injection(original, config).patch)
    result: dict[str, Any] = jsonpatch.apply_patch(original, patch)
    return result


def test_injected_pod_mounts_the_agent_socket_from_the_agents_csi_driver_read_only() -> None:
    injected = _injected(InjectorConfig())
    volume = next(v for v in injected["spec"]["volumes"] if v["name"] == SOCKET_VOLUME)
    assert volume == {"name": SOCKET_VOLUME, "csi": {"driver": DRIVER_NAME, "readOnly": True}}
    sidecar = next(c for c in injected["spec"]["initContainers"] if c["name"] == SIDECAR_NAME)
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == SOCKET_VOLUME)
    assert mount["readOnly"] is True


def test_injected_pod_has_no_host_path_volume_for_baseline_to_refuse() -> None:
    injected = _injected(InjectorConfig())
    assert [v["name"] for v in injected["spec"]["volumes"] if "hostPath" in v] == []


def test_without_the_csi_driver_the_socket_directory_is_a_host_path_as_before() -> None:
    injected = _injected(InjectorConfig(agent_socket_csi_driver=None))
    volume = next(v for v in injected["spec"]["volumes"] if v["name"] == SOCKET_VOLUME)
    assert volume["hostPath"] == {"path": "/run/trellis/workload", "type": "Directory"}
