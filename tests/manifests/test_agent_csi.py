"""The agent DaemonSet's CSI node plugin is wired as the kubelet, the plugin and the
injector each expect: one driver name everywhere, the registrar pointing the kubelet at the
socket the plugin serves, the plugin's arguments ones ``trellis agent-csi`` parses, and the
privilege confined to the container that mounts."""

from __future__ import annotations

import argparse
from pathlib import PurePosixPath
from typing import Any

from ca.agent import cli as agent_cli
from ca.agent.csi import DRIVER_NAME
from mesh_operator.injection import InjectorConfig

from .test_manifests import rendered, workload


def _containers() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in workload("DaemonSet", "trellis-agent")["containers"]}


def _host_path(container: dict[str, Any], mount_path: str) -> str:
    volumes = {v["name"]: v for v in workload("DaemonSet", "trellis-agent")["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    path: str = volumes[mount["name"]]["hostPath"]["path"]
    return path


def _parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    agent_cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(args)


def test_one_driver_name_in_the_csidriver_the_registrar_the_plugin_and_the_injector() -> None:
    (driver,) = [d for d in rendered() if d["kind"] == "CSIDriver"]
    assert driver["metadata"]["name"] == DRIVER_NAME == InjectorConfig().agent_socket_csi_driver
    assert driver["spec"]["volumeLifecycleModes"] == ["Ephemeral"]
    assert driver["spec"]["attachRequired"] is False
    assert driver["spec"]["fsGroupPolicy"] == "None"  # never chown the agent's directory


def test_the_registrar_names_on_the_host_the_socket_the_plugin_serves() -> None:
    containers = _containers()
    plugin = _parse(containers["csi"]["args"])
    assert plugin.handler is agent_cli.cmd_agent_csi
    registrar = dict(a.split("=", 1) for a in containers["node-driver-registrar"]["args"])
    assert registrar["--csi-address"] == str(plugin.csi_socket)
    in_container = PurePosixPath(str(plugin.csi_socket))
    on_host = PurePosixPath(_host_path(containers["csi"], str(in_container.parent)))
    assert registrar["--kubelet-registration-path"] == str(on_host / in_container.name)
    # The registrar reaches the same host directory.
    assert _host_path(containers["node-driver-registrar"], "/csi") == str(on_host)


def test_the_plugin_publishes_the_agents_socket_dir_into_the_kubelets_pods_dir() -> None:
    containers = _containers()
    plugin = _parse(containers["csi"]["args"])
    agent = _parse(containers["agent"]["args"])
    assert plugin.agent_socket_dir == agent.socket.parent
    pods = [m for m in containers["csi"]["volumeMounts"] if m["name"] == "kubelet-pods"]
    assert pods[0]["mountPath"] == str(plugin.csi_pods_dir)
    # The bind mounts must reach the host's mount namespace for the kubelet to see them.
    assert pods[0]["mountPropagation"] == "Bidirectional"
    assert _host_path(containers["csi"], str(plugin.csi_pods_dir)) == "/var/lib/kubelet/pods"


def test_only_the_mounting_container_is_privileged_and_the_agent_keeps_its_capabilities() -> None:
    containers = _containers()
    assert containers["csi"]["securityContext"]["privileged"] is True
    agent = containers["agent"]["securityContext"]
    assert "privileged" not in agent
    assert agent["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE", "DAC_READ_SEARCH"]}
    registrar = containers["node-driver-registrar"]["securityContext"]
    assert registrar["capabilities"] == {"drop": ["ALL"]}
    # The plugin holds no identity: no token, no agent state.
    names = {m["name"] for m in containers["csi"]["volumeMounts"]}
    assert names.isdisjoint({"psat", "state"})
