"""``helm install`` of charts/trellis into a real kube-apiserver, and ``helm uninstall``.

The control plane is tests/kube's (etcd + kube-apiserver, RBAC, default admission), one of
its own for this module so that nothing kustomize installed in another module's plane is
in the way. There is no kubelet: the tests assert what the API server holds (every object
the chart renders, the CRDs Established, the webhook configurations pointing at the
operator's Service), that the pods each workload would create are admitted, and that the
operator, started with the arguments the chart gives its container and the
ServiceAccount the chart grants, takes its Lease and fills in the caBundle of the
chart's webhook configurations. Then ``helm uninstall`` removes what it installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.controlplane import ControlPlane, start
from tests.support import free_port, wait_for

from .conftest import (
    CHART,
    RELEASE,
    REPO,
    SITE_NAMESPACE,
    SITE_VALUES,
    Render,
    containers,
    key,
    run_helm,
    values_file,
)

# The site values, less the Prometheus Operator's objects (its CRDs are not installed
# here) and with the CRDs removed on uninstall, so this test leaves nothing behind.
INSTALLED_SITE_VALUES: dict[str, Any] = {
    **SITE_VALUES,
    "monitoring": {"prometheusOperator": {"enabled": False}},
    "crds": {"keep": False},
}
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def plane(kube_bin: Path) -> Iterator[ControlPlane]:
    root = Path(tempfile.mkdtemp(prefix="trellis-chart-kube-"))
    try:
        control_plane = start(kube_bin, root / "plane")
        try:
            yield control_plane
        finally:
            control_plane.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _helm(helm: Path, plane: ControlPlane, *args: str) -> str:
    result = run_helm(helm, *args, f"--kubeconfig={plane.kubeconfig}", timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _manifest(docs: list[dict[str, Any]], folder: Path) -> Path:
    path = folder / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def _present(plane: ControlPlane, manifest: Path) -> set[tuple[str, str, str]]:
    """Which of the manifest's objects the API server holds (``kubectl get -f``)."""
    result = plane.kubectl("get", "-f", str(manifest), "-o", "json", "--ignore-not-found")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout) if result.stdout.strip() else {"items": []}
    items = listed.get("items", [listed] if "kind" in listed and listed["kind"] != "List" else [])
    return {key(item) for item in items}


def _established(plane: ControlPlane, docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["kind"] == "CustomResourceDefinition":
            plane.kubectl_ok(
                "wait", "--for=condition=Established", f"--timeout={TIMEOUT:.0f}s",
                f"crd/{doc['metadata']['name']}",
            )  # fmt: skip


def _assert_webhooks_point_at_the_operator_service(
    plane: ControlPlane, namespace: str, docs: list[dict[str, Any]]
) -> None:
    service = plane.get("-n", namespace, "service", "trellis-operator")
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (443, "webhook")
    deployment = plane.get("-n", namespace, "deployment", "trellis-operator")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (operator,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "webhook", "containerPort": 9443, "protocol": "TCP"} in operator["ports"]
    for kind, name in (
        ("mutatingwebhookconfiguration", "trellis-sidecar-injector"),
        ("validatingwebhookconfiguration", "trellis-validator"),
    ):
        stored = plane.get(kind, name)
        (rendered,) = [d for d in docs if d["kind"].lower() == kind]
        assert len(stored["webhooks"]) == len(rendered["webhooks"])
        for hook in stored["webhooks"]:
            target = hook["clientConfig"]["service"]
            assert (target["name"], target["namespace"], target["port"]) == (
                "trellis-operator",
                namespace,
                443,
            )
            assert target["path"] in ("/mutate", "/mutate/cni", "/validate")


def _assert_every_workloads_pods_are_admitted(
    plane: ControlPlane, docs: list[dict[str, Any]]
) -> None:
    """The Pod a ReplicaSet or the DaemonSet controller would create, created directly
    (dryRun: admitted in full, never stored): service accounts, priority classes, Pod
    Security and field validation all apply."""
    for doc in docs:
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        template = doc["spec"]["template"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {**template["metadata"], "name": f"{doc['metadata']['name']}-check"},
            "spec": template["spec"],
        }
        result = plane.kubectl(
            "-n", doc["metadata"]["namespace"], "create", "--dry-run=server", "-f", "-",
            stdin=json.dumps(pod),
        )  # fmt: skip
        assert result.returncode == 0, (key(doc), result.stderr)


def _run_operator_as_the_chart_configures_it(
    plane: ControlPlane, namespace: str, docs: list[dict[str, Any]], folder: Path
) -> None:
    """`trellis operator run` with the chart's container arguments, as the chart's
    ServiceAccount; only where it listens and its kubeconfig are this machine's."""
    (deployment,) = [d for d in docs if key(d) == ("Deployment", namespace, "trellis-operator")]
    (container,) = containers(deployment)
    assert container["command"] == ["trellis"]
    kubeconfig = plane.service_account_kubeconfig(namespace, "trellis-operator")
    cert_dir = folder / "webhook"
    cert_dir.mkdir()
    log = folder / "operator.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "trellis", *container["args"],
                f"--namespace={namespace}", "--identity=operator-chart",
                f"--kubeconfig={kubeconfig}", "--webhook-host=127.0.0.1",
                f"--webhook-port={free_port()}", f"--webhook-cert-dir={cert_dir}",
            ],
            stdout=out, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    try:

        def ca_bundles_filled() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the operator exited: {log.read_text()[-3000:]}")
            for kind, name in (
                ("mutatingwebhookconfiguration", "trellis-sidecar-injector"),
                ("validatingwebhookconfiguration", "trellis-validator"),
            ):
                hooks = plane.get(kind, name)["webhooks"]
                if not all(h["clientConfig"].get("caBundle") for h in hooks):
                    return False
            return True

        wait_for(ca_bundles_filled, TIMEOUT, "the operator to fill in the chart's caBundles")
        lease = plane.get("-n", namespace, "lease", "trellis-operator")
        assert lease["spec"]["holderIdentity"] == "operator-chart"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_helm_install_with_site_values_creates_every_object_and_uninstall_removes_them_all(
    helm: Path, plane: ControlPlane, render: Render, tmp_path: Path
) -> None:
    docs = render(INSTALLED_SITE_VALUES, namespace=SITE_NAMESPACE)
    manifest = _manifest(docs, tmp_path)
    values = values_file(INSTALLED_SITE_VALUES, tmp_path)
    _helm(
        helm, plane, "install", RELEASE, str(CHART), f"--namespace={SITE_NAMESPACE}",
        "--create-namespace", f"--values={values}",
    )  # fmt: skip
    assert _present(plane, manifest) == {key(d) for d in docs}
    _established(plane, docs)
    _assert_webhooks_point_at_the_operator_service(plane, SITE_NAMESPACE, docs)
    _assert_every_workloads_pods_are_admitted(plane, docs)
    _run_operator_as_the_chart_configures_it(plane, SITE_NAMESPACE, docs, tmp_path)

    _helm(helm, plane, "uninstall", RELEASE, f"--namespace={SITE_NAMESPACE}", "--wait")
    # CRDs go through the API server's own clean-up (their objects first): wait for it.
    wait_for(lambda: not _present(plane, manifest), TIMEOUT, "every object to be removed")
    releases = _helm(helm, plane, "list", f"--namespace={SITE_NAMESPACE}", "--output=json")
    assert json.loads(releases) == []


def test_helm_uninstall_keeps_the_crds_by_default_and_a_reinstall_adopts_them(
    helm: Path, plane: ControlPlane, render: Render, tmp_path: Path
) -> None:
    """crds.keep (the default): deleting a CRD deletes every identity and policy of its
    kind, so `helm uninstall` leaves the CRDs, and the next install takes them back."""
    docs = render({}, namespace="trellis-system")
    manifest = _manifest(docs, tmp_path)
    crds = {key(d) for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert len(crds) == 3
    install = ("install", RELEASE, str(CHART), "--namespace=trellis-system", "--create-namespace")
    try:
        _helm(helm, plane, *install)
        assert _present(plane, manifest) == {key(d) for d in docs}
        _established(plane, docs)
        _assert_webhooks_point_at_the_operator_service(plane, "trellis-system", docs)

        _helm(helm, plane, "uninstall", RELEASE, "--namespace=trellis-system", "--wait")
        assert _present(plane, manifest) == crds
        _established(plane, docs)

        _helm(helm, plane, *install)
        assert _present(plane, manifest) == {key(d) for d in docs}
        _helm(helm, plane, "uninstall", RELEASE, "--namespace=trellis-system", "--wait")
    finally:
        for _, _, name in crds:
            plane.kubectl("delete", "crd", name, "--ignore-not-found", "--wait=true")
