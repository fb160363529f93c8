"""``trellis check`` against a running mesh and against broken ones.

The mesh is ``trellis up``'s (``trellis.up.Mesh``, real processes: ``ca serve`` with its
admin socket, ``trellis agent``, three sidecars); the command reads the CA's admin socket
and the agent's and sidecars' admin ports over real sockets. The cluster checks run
against a real kube-apiserver (``tests/kube``): the webhook configuration and the serving
certificate's Secret are written the way the operator writes them, here by the test (no
operator runs: the certificate's expiry is what is under test), and the control plane's
Deployments and DaemonSet are real objects whose status the test reports through the
status subresource, as their controllers would (no controller-manager runs there).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_operator.webhook_certs import WebhookPki, plan_rotation, service_dns_names
from tests.kube.conftest import cluster, create_namespace, kube_bin  # noqa: F401 (fixtures)
from tests.kube.controlplane import ControlPlane
from trellis.cli import main
from trellis.diagnose.admin_http import fetch_json
from trellis.diagnose.check import check_sidecar
from trellis.up import Mesh, MeshConfig
from trellis.up.mesh import CA_ADMIN_SOCKET
from trellis.up.status import collect, render

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with Mesh(MeshConfig(start_load=False)) as running:
        yield running


def _address(mesh: Mesh, port_name: str) -> str:
    return f"127.0.0.1:{mesh.ports[port_name]}"


def _mesh_arguments(mesh: Mesh) -> list[str]:
    assert mesh.run_dir is not None
    return [
        "--ca-admin-socket", str(mesh.run_dir / CA_ADMIN_SOCKET),
        "--agent-admin", _address(mesh, "agent_admin"),
        "--sidecar-admin", _address(mesh, "echo_admin"),
        "--sidecar-admin", _address(mesh, "load_admin"),
    ]  # fmt: skip


def _check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["check", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_check_passes_on_a_running_mesh_with_one_line_per_check(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _check(capsys, *_mesh_arguments(mesh))
    lines = out.splitlines()
    assert status == 0, out + err
    assert lines[-1] == "all checks passed"
    names = [line[2:].split(": ", 1)[0] for line in lines[:-1]]
    echo, load, agent = (_address(mesh, n) for n in ("echo_admin", "load_admin", "agent_admin"))
    assert names == [
        "CA reachable",
        "CA intermediate valid",
        "agents attested",
        f"agent {agent} healthy",
        f"agent {agent} bundle matches the CA's",
        f"sidecar {echo} holds an SVID",
        f"sidecar {echo} bundle matches the CA's",
        f"sidecar {load} holds an SVID",
        f"sidecar {load} bundle matches the CA's",
    ]
    assert all(line.startswith("✔ ") for line in lines[:-1])
    assert "1 agent(s): local" in out
    assert "spiffe://example.org/ns/demo/sa/echo, expires in" in out


def test_the_check_command_trellis_up_shows_passes_against_its_mesh(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    """The status block names the CA's admin socket and the agent's admin address, and
    its ``check`` line, pasted, checks the running mesh (the intruder's sidecar too)."""
    view = mesh.status_view()
    lines = render(view, collect(view, time.time(), 1.0)).splitlines()
    assert mesh.run_dir is not None
    agent = _address(mesh, "agent_admin")
    assert f" admin     CA socket {mesh.run_dir / CA_ADMIN_SOCKET}, agent {agent}" in lines
    (line,) = [line for line in lines if line.startswith(" check ")]
    argv = shlex.split(line.removeprefix(" check "))
    assert argv[:2] == ["trellis", "check"]
    status, out, err = _check(capsys, *argv[2:])
    assert status == 0, out + err
    assert out.splitlines()[-1] == "all checks passed"
    assert f"agent {agent} healthy" in out
    assert f"sidecar {_address(mesh, 'intruder_admin')} holds an SVID" in out


def test_check_json_and_yaml_are_the_same_document(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = _check(capsys, *_mesh_arguments(mesh), "-o", "json")
    as_json: dict[str, Any] = json.loads(out)
    assert status == 0
    assert as_json["ok"] is True
    assert {c["name"] for c in as_json["checks"]} >= {"CA reachable", "agents attested"}
    assert all(c["fix"] is None for c in as_json["checks"])
    _, out, _ = _check(capsys, *_mesh_arguments(mesh), "-o", "yaml")
    as_yaml = yaml.safe_load(out)
    # The same checks; the details carry "expires in", which moves between the two runs.
    assert [c["name"] for c in as_yaml["checks"]] == [c["name"] for c in as_json["checks"]]


def test_a_sidecar_whose_bundle_or_svid_is_not_the_cas_fails_with_the_fix(mesh: Mesh) -> None:
    """The sidecar's real /config, judged against a CA whose roots differ (a root rotation
    that has not reached it) and at a time past its SVID's expiry: no running mesh can be
    made to hold a stale bundle or an expired SVID on demand, so the check's pure function
    is given the one input that differs."""
    echo = _address(mesh, "echo_admin")
    config = fetch_json("127.0.0.1", mesh.ports["echo_admin"], "/config")
    now = dt.datetime.now(dt.UTC)
    svid, bundle = check_sidecar(echo, config, {"1234"}, now)
    assert svid.ok
    assert not bundle.ok
    held = ", ".join(s for serials in config["identity"]["bundles"].values() for s in serials)
    assert bundle.detail == f"holds roots {held}, the CA 1234"
    assert bundle.fix == (
        f"the sidecar gets the bundle from the agent at {config['workload_api']['target']}:"
        " check the agent first"
    )
    later = dt.datetime.fromisoformat(config["identity"]["not_after"]) + dt.timedelta(seconds=1)
    (expired,) = check_sidecar(echo, config, None, later)  # no CA given: no bundle check
    assert not expired.ok
    assert expired.detail == "its SVID for spiffe://example.org/ns/demo/sa/echo has expired"
    assert expired.fix is not None and "trellis ca entries list" in expired.fix


def test_check_with_nothing_to_check_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trellis", "check"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == (
        "trellis: error: nothing to check: give --ca-admin-socket, --agent-admin,"
        " --sidecar-admin or --kube/--kubeconfig\n"
    )


def test_check_with_the_ca_down_fails_with_the_fix_to_start_it(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    """Last of the mesh tests: it stops the module's CA server."""
    arguments = _mesh_arguments(mesh)
    assert mesh.children["ca"].stop() == 0
    status, out, _ = _check(capsys, *arguments)
    assert status == 1
    lines = out.splitlines()
    socket = mesh.run_dir / CA_ADMIN_SOCKET if mesh.run_dir else None
    assert lines[0] == (
        f"✘ CA reachable: no CA admin socket at {socket} (is ca serve running with --admin-socket?)"
    )
    assert lines[1] == (
        "    fix: start the CA server (trellis ca serve ... --admin-socket PATH), or point"
        " --ca-admin-socket / $TRELLIS_CA_ADMIN_SOCKET at its socket"
    )
    # Without the CA nothing depends on it is judged; the agent serves from its cache.
    assert not any(line.startswith("✘ CA intermediate") for line in lines)
    assert any(line.startswith("✔ agent ") and "healthy" in line for line in lines)
    assert lines[-1] == "1 check(s) failed"


# -- the control plane and the webhook, through a real API server ----------------------------

WEBHOOK = "check-test-injector"
WEBHOOKS_MANIFEST = "manifests/operator/webhooks.yaml"
OPERATOR_NAMESPACE = "check-operator"


def _apply(plane: ControlPlane, document: dict[str, Any]) -> None:
    plane.kubectl_ok(
        "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=json.dumps(document)
    )


def _install_webhook(plane: ControlPlane, pki: WebhookPki) -> None:
    """The manifest's injection webhook under another name, served from another namespace,
    with the caBundle and Secret the operator's leader would write (webhook_certs)."""
    manifest = next(yaml.safe_load_all((REPO / WEBHOOKS_MANIFEST).read_text()))
    manifest["metadata"] = {"name": WEBHOOK}
    for hook in manifest["webhooks"]:
        hook["clientConfig"]["service"]["namespace"] = OPERATOR_NAMESPACE
        hook["clientConfig"]["caBundle"] = base64.b64encode(pki.ca_bundle).decode()
        # Never selects a namespace: no pod creation of another test is sent to it.
        hook["namespaceSelector"] = {"matchLabels": {"trellis.dev/check-test": "never"}}
    _apply(plane, manifest)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": "trellis-webhook-tls", "namespace": OPERATOR_NAMESPACE},
        "data": {k: base64.b64encode(v).decode() for k, v in pki.secret_data().items()},
    }
    _apply(plane, secret)


def _workload(kind: str, name: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": labels},
        "template": {
            "metadata": {"labels": labels},
            "spec": {"containers": [{"name": name, "image": "trellis:test"}]},
        },
    }
    if kind == "Deployment":
        spec["replicas"] = 1
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": OPERATOR_NAMESPACE},
        "spec": spec,
    }


def _report(plane: ControlPlane, kind: str, name: str, status: dict[str, int]) -> None:
    """What the Deployment or DaemonSet controller would report (none runs here)."""
    plane.kubectl_ok(
        "-n", OPERATOR_NAMESPACE, "patch", kind.lower(), name, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": status}),
    )  # fmt: skip


def _control_plane(plane: ControlPlane, *, ca_available: int) -> None:
    up = {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1}
    down = {"replicas": 1, "readyReplicas": 0, "availableReplicas": 0, "unavailableReplicas": 1}
    _report(plane, "Deployment", "trellis-ca", up if ca_available else down)
    _report(plane, "Deployment", "trellis-operator", up)
    nodes = {"currentNumberScheduled": 2, "numberMisscheduled": 0, "desiredNumberScheduled": 2}
    _report(plane, "DaemonSet", "trellis-agent", {**nodes, "numberReady": 2})


@pytest.fixture(scope="module")
def kube_plane(cluster: ControlPlane) -> ControlPlane:  # noqa: F811 (the imported fixture)
    if cluster.kubectl("get", "namespace", OPERATOR_NAMESPACE).returncode != 0:
        create_namespace(cluster, OPERATOR_NAMESPACE)
    for kind, name in (
        ("Deployment", "trellis-ca"),
        ("DaemonSet", "trellis-agent"),
        ("Deployment", "trellis-operator"),
    ):
        _apply(cluster, _workload(kind, name))
    return cluster


def _pki(issued: dt.datetime) -> WebhookPki:
    names = service_dns_names("trellis-operator", OPERATOR_NAMESPACE)
    return plan_rotation(None, dns_names=names, now=issued).pki


def _kube_check(
    plane: ControlPlane, capsys: pytest.CaptureFixture[str], webhook: str = WEBHOOK
) -> tuple[int, dict[str, str]]:
    """The exit status, and each check's line (with its fix line, if any) by name."""
    status, out, _ = _check(
        capsys, "--kubeconfig", str(plane.kubeconfig), "--webhook", webhook,
        "--operator-namespace", OPERATOR_NAMESPACE,
    )  # fmt: skip
    lines: dict[str, str] = {}
    name = ""
    for line in out.splitlines()[:-1]:
        if line.startswith("    fix: "):
            lines[name] += "\n" + line
        else:
            name = line[2:].split(": ", 1)[0]
            lines[name] = line
    return status, lines


def test_check_passes_for_a_running_control_plane_and_a_valid_webhook_certificate(
    kube_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    _control_plane(kube_plane, ca_available=1)
    _install_webhook(kube_plane, _pki(dt.datetime.now(dt.UTC)))
    status, lines = _kube_check(kube_plane, capsys)
    assert status == 0, lines
    hooks = len(next(yaml.safe_load_all((REPO / WEBHOOKS_MANIFEST).read_text()))["webhooks"])
    assert list(lines.values()) == [
        "✔ CA server available: 1/1 replica(s) available",
        "✔ operator available: 1/1 replica(s) available",
        "✔ agents ready: 2/2 node(s) with an attested, synced agent",
        f"✔ webhook configured: {WEBHOOK}: {hooks} webhook(s), failurePolicy Fail",
        lines["webhook certificate valid"],
    ]
    # 30 days less the 5 minutes it is backdated: 719h55m and some seconds.
    assert lines["webhook certificate valid"].startswith(
        f"✔ webhook certificate valid: trellis-operator.{OPERATOR_NAMESPACE}.svc, expires in 71"
    )


def test_check_with_the_ca_deployment_down_fails_with_the_fix(
    kube_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    _control_plane(kube_plane, ca_available=0)
    _install_webhook(kube_plane, _pki(dt.datetime.now(dt.UTC)))
    status, lines = _kube_check(kube_plane, capsys)
    assert status == 1
    assert lines["CA server available"] == (
        "✘ CA server available: 0/1 replica(s) available: agents cannot renew SVIDs\n"
        f"    fix: kubectl -n {OPERATOR_NAMESPACE} describe deployment trellis-ca;"
        f" kubectl -n {OPERATOR_NAMESPACE} logs deployment/trellis-ca"
    )
    assert [name for name, line in lines.items() if line.startswith("✘")] == ["CA server available"]


def test_check_fails_for_an_expired_webhook_certificate_with_the_fix(
    kube_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    _control_plane(kube_plane, ca_available=1)
    issued = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)  # 30-day certificate: 10 days ago
    _install_webhook(kube_plane, _pki(issued))
    status, lines = _kube_check(kube_plane, capsys)
    assert status == 1
    assert lines["webhook configured"].startswith("✔ webhook configured")
    failed, fix = lines["webhook certificate valid"].split("\n")
    assert failed.startswith("✘ webhook certificate valid: the serving certificate expired 2")
    assert failed.endswith(
        "the API server refuses the webhook, and with failurePolicy Fail every injected pod"
        " creation fails"
    )
    assert fix == (
        f"    fix: kubectl -n {OPERATOR_NAMESPACE} rollout restart deployment/trellis-operator"
        " (the operator's leader renews the webhook certificate at start, then hourly)"
    )


def test_check_fails_for_a_missing_webhook_configuration_with_the_install_fix(
    kube_plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    _control_plane(kube_plane, ca_available=1)
    status, lines = _kube_check(kube_plane, capsys, webhook="no-such-webhook")
    assert status == 1
    assert lines["webhook configured"] == (
        "✘ webhook configured: no MutatingWebhookConfiguration no-such-webhook\n"
        "    fix: install the manifests: kubectl apply -k manifests/ --server-side"
    )
