"""``trellis proxy config`` and ``trellis proxy status`` against real sidecars.

The sidecars are ``trellis up``'s (``trellis.up.Mesh``: real ``ca serve``, agent and sidecar
processes); the commands read each sidecar's admin ``/config`` over a real socket.

A POD target is resolved through a real kube-apiserver (``tests/kube``). No kubelet runs
there, so neither ``pods/portforward`` nor ``pods/proxy`` can reach a pod: the tests check
the name-to-admin-port resolution against the API server (the pod object names the
sidecar's ``--admin-port``; its ``status.podIP``, which a kubelet would write, is written
by the test as 127.0.0.1) and make the admin call with ``--via pod-ip`` to a real sidecar on
loopback. That the port-forward path fails in one line without a kubelet is checked too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.conftest import cluster, create_namespace, kube_bin  # noqa: F401 (fixtures)
from tests.kube.controlplane import ControlPlane
from tests.support import free_port
from trellis.cli import main
from trellis.up import Mesh, MeshConfig
from trellis.up.mesh import CA_ADMIN_SOCKET

REPO = Path(__file__).resolve().parents[2]
ECHO = "spiffe://example.org/ns/demo/sa/echo"
LOAD = "spiffe://example.org/ns/demo/sa/load"


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with Mesh(MeshConfig(start_load=False)) as running:
        yield running


def _address(mesh: Mesh, port_name: str) -> str:
    return f"127.0.0.1:{mesh.ports[port_name]}"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    assert err == "", err
    return status, out


def test_proxy_config_of_an_address_shows_identity_listeners_and_policy(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    echo = _address(mesh, "echo_admin")
    status, out = _run(capsys, "proxy", "config", echo)
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"sidecar      {echo} (mode explicit, ready)"
    assert lines[1].startswith(f"identity     {ECHO} (serial ")
    assert "SVID expires in " in lines[1]
    assert f"listener     admin {echo}" in lines
    # The rules, and where they come from: echo's are the sidecar config's own.
    assert f"policy       port 8080: exact:{LOAD} (from inbound.targets.8080.allow)" in lines
    assert any(line.startswith("inbound      port 8080 -> 127.0.0.1:") for line in lines)

    status, out = _run(capsys, "proxy", "config", _address(mesh, "load_admin"))
    assert status == 0
    upstream = next(line for line in out.splitlines() if line.startswith("upstream"))
    assert upstream.endswith(f" as {ECHO}")


def test_proxy_config_json_and_yaml_carry_the_sidecars_own_config(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    echo = _address(mesh, "echo_admin")
    _, out = _run(capsys, "proxy", "config", echo, "-o", "json")
    as_json: dict[str, Any] = json.loads(out)
    assert as_json["name"] == echo
    assert as_json["config"]["identity"]["spiffe_id"] == ECHO
    assert as_json["config"]["inbound"]["policy"]["ports"] == {"8080": [f"exact:{LOAD}"]}
    _, out = _run(capsys, "proxy", "config", echo, "-o", "yaml")
    as_yaml = yaml.safe_load(out)
    assert as_yaml["config"]["identity"] == as_json["config"]["identity"]
    assert as_yaml["config"]["inbound"]["policy"] == as_json["config"]["inbound"]["policy"]


def test_proxy_status_lists_each_sidecar_with_its_bundle_in_sync_with_the_ca(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mesh.run_dir is not None
    names = ("echo_admin", "load_admin", "intruder_admin")
    addresses = [_address(mesh, n) for n in names]
    socket = str(mesh.run_dir / CA_ADMIN_SOCKET)
    status, out = _run(capsys, "proxy", "status", *addresses, "--ca-admin-socket", socket)
    assert status == 0
    header, *rows = out.splitlines()
    assert header.split() == [
        "NAME", "SPIFFE", "ID", "SVID", "EXPIRES", "IN", "READY", "POOLS", "CONNS", "BUNDLE",
    ]  # fmt: skip
    assert [row.split()[:2] for row in rows] == [
        [addresses[0], ECHO],
        [addresses[1], LOAD],
        [addresses[2], "spiffe://example.org/ns/demo/sa/intruder"],
    ]
    assert all(row.split()[-1] == "sync" and row.split()[-2] == "in" for row in rows)
    _, out = _run(capsys, "proxy", "status", *addresses, "-o", "json")
    assert [r["spiffe_id"] for r in json.loads(out)["sidecars"]] == [
        ECHO,
        LOAD,
        "spiffe://example.org/ns/demo/sa/intruder",
    ]


def test_proxy_status_marks_a_sidecar_that_does_not_answer_and_exits_1(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    silent = f"127.0.0.1:{free_port()}"
    status, out = _run(capsys, "proxy", "status", _address(mesh, "echo_admin"), silent)
    assert status == 1
    rows = out.splitlines()[1:]
    assert rows[0].split()[1] == ECHO
    assert rows[1].startswith(f"{silent}  UNREACHABLE: no answer from http://{silent}/config")


def test_proxy_config_of_an_address_nothing_answers_on_is_one_line() -> None:
    silent = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "trellis", "proxy", "config", silent],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"trellis: error: no answer from http://{silent}/config: [Errno 111] Connection refused\n"
    )


# -- a pod, through a real API server ----------------------------------------------------------

NAMESPACE = "proxy-cli"


def _pod(name: str, admin_port: int | None) -> dict[str, Any]:
    """A pod as the injector leaves it (the sidecar a native sidecar init container), or
    one without a sidecar when ``admin_port`` is None."""
    init = [
        {
            "name": "trellis-sidecar",
            "image": "trellis:test",
            "restartPolicy": "Always",
            "args": ["sidecar", "--mode=explicit", f"--admin-port={admin_port}"],
        }
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
        "spec": {
            "initContainers": init if admin_port is not None else [],
            "containers": [{"name": "app", "image": "app:test"}],
        },
    }


@pytest.fixture(scope="module")
def pods(cluster: ControlPlane, mesh: Mesh) -> ControlPlane:  # noqa: F811 (imported fixture)
    if cluster.kubectl("get", "namespace", NAMESPACE).returncode != 0:
        create_namespace(cluster, NAMESPACE)
    for name, port in (("echo-0", mesh.ports["echo_admin"]), ("plain-0", None)):
        cluster.kubectl(
            "-n", NAMESPACE, "delete", "pod", name, "--ignore-not-found", "--wait=false"
        )
        cluster.kubectl_ok("create", "-f", "-", stdin=json.dumps(_pod(name, port)))
        # What the kubelet would report once the pod runs: its IP (here, loopback).
        status = {"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}}
        cluster.kubectl_ok(
            "-n", NAMESPACE, "patch", "pod", name, "--subresource=status", "--type=merge",
            "-p", json.dumps(status),
        )  # fmt: skip
    return cluster


def test_proxy_config_of_a_pod_finds_its_sidecars_admin_port_through_the_api_server(
    pods: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    kube = ("-n", NAMESPACE, "--kubeconfig", str(pods.kubeconfig), "--via", "pod-ip")
    status, out = _run(capsys, "proxy", "config", "echo-0", *kube, "-o", "json")
    assert status == 0
    document = json.loads(out)
    assert document["name"] == f"{NAMESPACE}/echo-0"
    assert document["config"]["identity"]["spiffe_id"] == ECHO

    status, out = _run(capsys, "proxy", "status", *kube)
    assert status == 0
    assert [row.split()[:2] for row in out.splitlines()[1:]] == [[f"{NAMESPACE}/echo-0", ECHO]]


def test_proxy_config_of_a_pod_without_a_sidecar_is_one_line(pods: ControlPlane) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "trellis", "proxy", "config", "plain-0", "-n", NAMESPACE,
            "--kubeconfig", str(pods.kubeconfig),
        ],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        f"trellis: error: pod {NAMESPACE}/plain-0 has no trellis-sidecar container (not"
        " injected: is its namespace labelled trellis.dev/inject=enabled?)\n"
    )


def test_proxy_config_through_a_port_forward_without_a_kubelet_is_one_line(
    pods: ControlPlane,
) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "trellis", "proxy", "config", "echo-0", "-n", NAMESPACE,
            "--kubeconfig", str(pods.kubeconfig),
        ],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        f"trellis: error: port-forward to {NAMESPACE}/echo-0: refused by the API server:"
        " pod echo-0 does not have a host assigned\n"
    )
