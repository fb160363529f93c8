"""``trellis policy explain``: which rule admits or refuses a caller, by the sidecar's own
``decide``.

From a policy file (the ``SidecarPolicy`` document the operator writes), from a running
sidecar (``trellis up``'s echo sidecar, whose verdicts are checked against real calls
through the mesh: what ``explain`` says is what the sidecar did), and from a namespace's
``trellis-policy`` ConfigMap and a pod's labels read through a real kube-apiserver.
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
from tests.sidecar.dataplane.conftest import pki, procs  # noqa: F401 (fixtures)
from tests.sidecar.dataplane.harness import Pki, Procs, start_sidecar
from tests.support import free_port
from trellis.cli import main
from trellis.up import Mesh, MeshConfig
from trellis.up.mesh import ECHO_TARGET_PORT, probe

REPO = Path(__file__).resolve().parents[2]
WEB = "spiffe://example.org/ns/front/sa/web"
TOOL = "spiffe://example.org/ns/tools/sa/debugger"
STRANGER = "spiffe://example.org/ns/shop/sa/stranger"

DOCUMENT: dict[str, Any] = {
    "apiVersion": "trellis.dev/v1alpha1",
    "kind": "SidecarPolicy",
    "namespace": "shop",
    "trustDomain": "example.org",
    "policies": [
        {
            "name": "ledger",
            "selector": {"matchLabels": {"app": "ledger"}},
            "ports": [8080],
            "allow": [{"exact": WEB}],
        },
        {
            "name": "tools",
            "selector": {"matchLabels": {"app": "ledger"}},
            "allow": [{"prefix": "spiffe://example.org/ns/tools"}],
        },
        {
            "name": "lockdown",
            "selector": {"matchLabels": {"app": "vault"}},
            "ports": [9000],
            "allow": [],
        },
    ],
}


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(DOCUMENT))
    return path


def _explain(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    status = main(["policy", "explain", *argv])
    out, err = capsys.readouterr()
    assert err == "", err
    return status, out.splitlines()


def test_explain_names_the_rule_and_policy_that_admit_a_caller(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = _explain(
        capsys,
        "--caller",
        WEB,
        "--port",
        "8080",
        "--policy",
        str(policy_file),
        "--labels",
        "app=ledger",
    )
    assert status == 0
    assert lines == [
        f"ALLOWED: {WEB} on port 8080",
        f"  reason: exact:{WEB}",
        "  decided by: AccessPolicy ledger, AccessPolicy tools",
        "  AccessPolicy ledger (8080):",
        f"    matches  exact:{WEB}",
        "  AccessPolicy tools (every port):",
        "    no match  prefix:spiffe://example.org/ns/tools",
    ]


def test_explain_of_a_refused_caller_exits_1_with_the_policies_to_change(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = _explain(
        capsys, "--caller", STRANGER, "--port", "8080", "--policy", str(policy_file),
        "--labels", "app=ledger",
    )  # fmt: skip
    assert status == 1
    assert lines[0] == f"DENIED: {STRANGER} on port 8080"
    assert lines[1] == f"  reason: {STRANGER} matches no rule for port 8080"
    assert lines[-1] == (
        f"  fix: add {{exact: {STRANGER}}} to the allow list of AccessPolicy ledger, tools"
    )


def test_explain_of_a_deny_all_policy_says_it_allows_nobody(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = _explain(
        capsys, "--caller", TOOL, "--port", "9000", "--policy", str(policy_file),
        "--labels", "app=vault", "-o", "json",
    )  # fmt: skip
    assert status == 1
    document = json.loads("\n".join(lines))
    assert document["allowed"] is False
    assert document["decided_by"] == "AccessPolicy lockdown"
    assert document["rules"] == []
    assert document["fix"] == (
        f"AccessPolicy lockdown allows nobody on port 9000 (empty allow): add {{exact: {TOOL}}}"
        " to its allow list"
    )


def test_explain_of_an_uncovered_port_applies_the_same_trust_domain_default(
    policy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = _explain(
        capsys, "--caller", STRANGER, "--port", "8080", "--policy", str(policy_file),
        "--labels", "app=other", "-o", "yaml",
    )  # fmt: skip
    assert status == 0
    document = yaml.safe_load("\n".join(lines))
    assert document["allowed"] is True
    assert document["reason"] == "default: same trust domain"
    assert document["rules"] is None

    foreign = "spiffe://other.org/ns/shop/sa/web"
    status, lines = _explain(
        capsys, "--caller", foreign, "--port", "8080", "--policy", str(policy_file),
        "--labels", "app=other",
    )  # fmt: skip
    assert status == 1
    assert lines[-1].startswith("  fix: a caller from other.org needs a rule: add an AccessPolicy")


def test_explain_of_a_malformed_policy_file_is_one_line_naming_the_field(tmp_path: Path) -> None:
    broken = json.loads(json.dumps(DOCUMENT))
    broken["policies"][0]["allow"][0]["exact"] = "https://example.org/web"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = subprocess.run(
        [
            sys.executable, "-m", "trellis", "policy", "explain", "--caller", WEB,
            "--port", "8080", "--policy", str(path),
        ],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith(f"trellis: error: {path}: policy.policies[0].allow[0].exact: ")
    assert result.stderr.count("\n") == 1


# -- a running sidecar's policy, checked against what it does ----------------------------------


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with Mesh(MeshConfig(start_load=False)) as running:
        yield running


def test_explain_against_a_running_sidecar_agrees_with_what_the_sidecar_does(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    echo_admin = f"127.0.0.1:{mesh.ports['echo_admin']}"
    port = str(ECHO_TARGET_PORT)
    load, intruder = mesh.config.spiffe_id("load"), mesh.config.spiffe_id("intruder")

    status, lines = _explain(capsys, "--caller", str(load), "--port", port, "--sidecar", echo_admin)
    assert status == 0
    assert lines[:2] == [f"ALLOWED: {load} on port {port}", f"  reason: exact:{load}"]
    # The same caller, for real: load's sidecar carries the call and echo's admits it.
    assert probe("127.0.0.1", mesh.ports["load_upstream"]) == "ADMITTED: the policy did not hold"

    status, lines = _explain(
        capsys, "--caller", str(intruder), "--port", port, "--sidecar", echo_admin
    )
    assert status == 1
    assert lines[0] == f"DENIED: {intruder} on port {port}"
    # Named as the sidecar names it in a refusal: the config key that holds echo's rules.
    assert lines[2] == f"  decided by: inbound.targets.{port}.allow"
    assert lines[-1] == (
        f"  fix: add {{exact: {intruder}}} to the allow list of the sidecar config's"
        f" inbound.targets.{port}.allow"
    )
    # And the intruder's real call was refused by echo's sidecar.
    assert mesh.policy_probe is not None
    assert not mesh.policy_probe.startswith("ADMITTED")
    assert not probe("127.0.0.1", mesh.ports["intruder_upstream"]).startswith("ADMITTED")


def test_explain_against_a_sidecar_enforcing_access_policies_names_them(
    procs: Procs,  # noqa: F811 (the imported fixture)
    pki: Pki,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real sidecar given the operator's document and a pod's labels, as in a cluster;
    explain reads only its /config, which names each port's AccessPolicies (and no more)."""
    workdir = procs.workdir
    (workdir / "policy.json").write_text(json.dumps(DOCUMENT))
    (workdir / "labels").write_text('app="ledger"\n')
    ledger = start_sidecar(
        procs,
        "ledger",
        {
            "svid_dir": str(pki.write(workdir / "svid", "spiffe://example.org/ns/shop/sa/ledger")),
            "inbound": {"targets": {8080: {"app": f"127.0.0.1:{free_port()}"}}},
        },
        extra_args=[
            "--policy",
            str(workdir / "policy.json"),
            "--pod-labels",
            str(workdir / "labels"),
        ],
    )
    policy = ledger.describe()["inbound"]["policy"]
    assert policy["sources"] == {"8080": ["AccessPolicy ledger"]}
    assert policy["any_port_sources"] == ["AccessPolicy tools"]
    admin = f"127.0.0.1:{ledger.admin_port}"

    status, lines = _explain(capsys, "--caller", WEB, "--port", "8080", "--sidecar", admin)
    assert status == 0
    assert lines[:3] == [
        f"ALLOWED: {WEB} on port 8080",
        f"  reason: exact:{WEB}",
        "  decided by: AccessPolicy ledger, AccessPolicy tools",
    ]
    status, lines = _explain(
        capsys, "--caller", STRANGER, "--port", "8080", "--sidecar", admin, "-o", "json"
    )
    assert status == 1
    document = json.loads("\n".join(lines))
    assert document["decided_by"] == "AccessPolicy ledger, AccessPolicy tools"
    assert document["sources"] == ["AccessPolicy ledger", "AccessPolicy tools"]
    assert document["fix"] == (
        f"add {{exact: {STRANGER}}} to the allow list of AccessPolicy ledger, tools"
    )
    # proxy config reads the same /config: each rule with the policy it comes from.
    assert main(["proxy", "config", admin]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"policy       port 8080: exact:{WEB} (from AccessPolicy ledger)" in lines
    assert (
        "policy       any port: prefix:spiffe://example.org/ns/tools (from AccessPolicy tools)"
    ) in lines


# -- a namespace's policy and a pod's labels, through a real API server ------------------------

NAMESPACE = "policy-explain"


@pytest.fixture(scope="module")
def shop(cluster: ControlPlane) -> ControlPlane:  # noqa: F811 (the imported fixture)
    if cluster.kubectl("get", "namespace", NAMESPACE).returncode != 0:
        create_namespace(cluster, NAMESPACE)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "trellis-policy", "namespace": NAMESPACE},
        "data": {"policy.json": json.dumps({**DOCUMENT, "namespace": NAMESPACE})},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ledger-0", "namespace": NAMESPACE, "labels": {"app": "ledger"}},
        "spec": {"containers": [{"name": "app", "image": "ledger:test"}]},
    }
    for document in (config_map, pod):
        cluster.kubectl_ok(
            "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=json.dumps(document)
        )
    return cluster


def test_explain_reads_the_namespace_policy_and_the_pods_labels_through_the_api_server(
    shop: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    kube = ("--namespace", NAMESPACE, "--kubeconfig", str(shop.kubeconfig))
    status, lines = _explain(capsys, "--caller", TOOL, "--port", "8080", *kube, "--pod", "ledger-0")
    assert status == 0
    assert lines[:3] == [
        f"ALLOWED: {TOOL} on port 8080",
        "  reason: prefix:spiffe://example.org/ns/tools",
        "  decided by: AccessPolicy ledger, AccessPolicy tools",
    ]
    status, lines = _explain(
        capsys, "--caller", STRANGER, "--port", "8080", *kube, "--pod", "ledger-0"
    )
    assert status == 1
    assert lines[0] == f"DENIED: {STRANGER} on port 8080"
