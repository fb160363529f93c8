"""From a ClusterWorkloadIdentity to an X509-SVID in the workload's hands.

Everything a node would run, minus the container runtime: the operator (two replicas)
writes the entries ConfigMap; its ``entries.yaml`` is copied to the file ``trellis ca
serve --entries`` reads (the CA Deployment's ConfigMap volume); ``trellis agent
--kubernetes`` attests with a projected token (PSAT) and watches the Pods on its node with
the ``trellis-agent`` ServiceAccount's token; the workload is a process in a cgroup named
for the stored Pod's UID, fetching its SVID with py-spiffe.

Two stand-ins, because no kubelet runs here: the agent's in-cluster token and CA
certificate are bind-mounted at ``/var/run/secrets/kubernetes.io/serviceaccount`` in a
private mount namespace (what the kubelet mounts into the agent's pod), and the workload
moves itself into ``<cgroup v2 root>/kubepods/pod<uid>`` (the path the kubelet's cgroupfs
driver gives a pod), which the test removes afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from ca.keys import write_private_file
from tests.ca.agent.test_e2e_pyspiffe import REPO, Mesh, _make_ca_dir, _stop
from tests.support import wait_for

from .conftest import NAMESPACE, Operators, create_namespace

NODE = "node-a"
CGROUP_ROOT = Path("/sys/fs/cgroup/unified")  # the cgroup v2 hierarchy of a hybrid host
WORKLOAD = """
import os, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as procs:
    procs.write(str(os.getpid()))
from spiffe import WorkloadApiClient
client = WorkloadApiClient(sys.argv[2], default_timeout=20)
try:
    print(client.fetch_x509_svid().spiffe_id)
finally:
    client.close()
"""


def _cgroup_root() -> Path:
    for candidate in (CGROUP_ROOT, Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.procs").is_file() and (candidate / "cgroup.max.depth").exists():
            return candidate
    pytest.skip("no writable cgroup v2 hierarchy to place the workload in")


def _entries_yaml(operators: Operators) -> str:
    result = operators.plane.kubectl(
        "-n", NAMESPACE, "get", "configmap", "trellis-registration-entries", "-o", "json"
    )
    if result.returncode != 0:
        return ""
    return str(json.loads(result.stdout).get("data", {}).get("entries.yaml", ""))


def _store(operators: Operators, obj: dict[str, Any]) -> dict[str, Any]:
    plane = operators.plane
    plane.kubectl_ok("create", "-f", "-", stdin=json.dumps(obj))
    meta = obj["metadata"]
    namespace = ("-n", meta["namespace"]) if "namespace" in meta else ()
    return plane.get(*namespace, obj["kind"].lower(), meta["name"])


def test_identity_reaches_the_workload_through_the_ca_and_the_agent(
    operators: Operators, tmp_path: Path
) -> None:
    plane = operators.plane
    cgroups = _cgroup_root()
    if plane.kubectl("get", "node", NODE).returncode != 0:
        _store(operators, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    namespace = f"svid-{uuid.uuid4().hex[:6]}"
    create_namespace(plane, namespace)
    plane.kubectl_ok("-n", namespace, "create", "serviceaccount", "ledger")
    pod = _store(
        operators,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "ledger-0", "namespace": namespace, "labels": {"app": "ledger"}},
            "spec": {
                "serviceAccountName": "ledger",
                "nodeName": NODE,
                "containers": [{"name": "app", "image": "registry.example/ledger:1"}],
            },
        },
    )
    _store(
        operators,
        {
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "ClusterWorkloadIdentity",
            "metadata": {"name": namespace},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "podSelector": {"matchLabels": {"app": "ledger"}},
            },
        },
    )
    spiffe_id = f"spiffe://example.org/ns/{namespace}/sa/ledger"
    wait_for(lambda: spiffe_id in _entries_yaml(operators), 60, f"the entry for {spiffe_id}")

    # The CA, reading the operator's entries as the ConfigMap volume would present them.
    workdir = tmp_path
    _make_ca_dir(workdir / "ca")
    (workdir / "entries.yaml").write_text(_entries_yaml(operators))
    short = Path(tempfile.mkdtemp(prefix="tr-svid-"))
    mesh = Mesh(workdir, short / "agent.sock")
    ca_kubeconfig = plane.service_account_kubeconfig(NAMESPACE, "trellis-ca")
    mesh.start_ca(
        mint_token=False,
        extra=[
            "--k8s-psat",
            f"--kubeconfig={ca_kubeconfig}",
            f"--psat-allow={NAMESPACE}:trellis-agent",
        ],
    )

    # The agent's pod, its two tokens (PSAT for the CA; API audience for the pod watch).
    agent_pod = _store(
        operators,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"trellis-agent-{namespace}", "namespace": NAMESPACE},
            "spec": {
                "serviceAccountName": "trellis-agent",
                "nodeName": NODE,
                "containers": [{"name": "agent", "image": "ghcr.io/trellis-mesh/trellis:0.1.0"}],
            },
        },
    )
    psat = plane.request_token(NAMESPACE, "trellis-agent", audience="trellis-ca", pod=agent_pod)
    write_private_file(workdir / "psat-token", psat.encode())
    account = workdir / "serviceaccount"
    account.mkdir()
    api_token = plane.request_token(NAMESPACE, "trellis-agent", pod=agent_pod)
    write_private_file(account / "token", api_token.encode())
    shutil.copy(plane.ca_file, account / "ca.crt")
    mount = (
        "mount -t tmpfs tmpfs /run && mkdir -p /run/secrets/kubernetes.io/serviceaccount && "
        'mount --bind "$0" /run/secrets/kubernetes.io/serviceaccount && exec "$@"'
    )
    port = plane.server.rsplit(":", 1)[1]
    agent = subprocess.Popen(
        [
            "unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(account),
            sys.executable, "-m", "trellis", *mesh.agent_args(), "--kubernetes",
            "--psat-token-file", str(workdir / "psat-token"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO),
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": port,
        },
    )  # fmt: skip
    cgroup = cgroups / "kubepods" / f"pod{pod['metadata']['uid']}"
    try:
        wait_for(
            lambda: agent.poll() is None and mesh.socket_path.is_socket(),
            60,
            "the agent's socket",
        )
        cgroup.mkdir(parents=True)
        workload = subprocess.run(
            [sys.executable, "-c", WORKLOAD, str(cgroup), mesh.endpoint],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert workload.returncode == 0, (workload.stderr[-2000:], _stop(agent)[-3000:])
        assert workload.stdout.strip() == spiffe_id
    finally:
        _stop(agent)
        mesh.stop()
        for folder in (cgroup, cgroup.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()
        shutil.rmtree(short, ignore_errors=True)
