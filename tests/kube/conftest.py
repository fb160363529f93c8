"""Fixtures for the tests against a real kube-apiserver (see ``controlplane.py``).

One control plane per pytest session (per pytest-xdist worker): seconds to start and
300 MB of memory. The binaries must already be built (``make kube``, which ``make test``
runs first): building takes far longer than a test may, so a missing build is a skip
naming the command, which CI (``CI=true``) turns into a failure.

The operator runs as a ``trellis operator run`` process per replica, authenticated as the
``trellis-operator`` ServiceAccount, so the RBAC in manifests/ decides what it may do.
The test process plays the kubelet's one part the operator depends on: it copies the
webhook Secret the leader writes into each replica's certificate folder (the Deployment's
Secret volume).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, wait_for

from .binaries import KUBERNETES_VERSION, KubeUnavailable, build, cache_dir, cached, modules_hash
from .controlplane import WEBHOOK_HOST, ControlPlane, start

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
NAMESPACE = "trellis-system"
TRUST_DOMAIN = "example.org"


@pytest.fixture(scope="session")
def kube_bin() -> Path:
    try:
        from tests.interop.go_peers import go_binary, go_version

        stamp = modules_hash(go_version(go_binary()))
    except Exception as exc:  # GoPeersUnavailable: no toolchain, hence no build
        pytest.skip(f"Kubernetes control plane: {exc}")
    if not cached(cache_dir(), stamp):
        pytest.skip(
            f"kube-apiserver {KUBERNETES_VERSION} is not built yet: run `make kube` "
            "(python -m tests.kube.binaries)"
        )
    try:
        return build()
    except KubeUnavailable as exc:
        pytest.skip(f"Kubernetes control plane: {exc}")


@pytest.fixture(scope="session")
def cluster(kube_bin: Path) -> Iterator[ControlPlane]:
    root = Path(tempfile.mkdtemp(prefix="trellis-kube-"))
    try:
        plane = start(kube_bin, root / "plane")
        try:
            yield plane
        finally:
            plane.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class Installed:
    """``kubectl apply -k manifests/ --server-side`` as a user runs it, and its output."""

    plane: ControlPlane
    apply: subprocess.CompletedProcess[str]


@pytest.fixture(scope="session")
def installed(cluster: ControlPlane) -> Installed:
    result = cluster.kubectl("apply", "-k", str(MANIFESTS), "--server-side")
    if result.returncode == 0:
        cluster.kubectl_ok(
            "wait", "--for=condition=Established", "--timeout=60s", "crd", "-l",
            "app.kubernetes.io/part-of=trellis",
        )  # fmt: skip
    return Installed(cluster, result)


def create_namespace(plane: ControlPlane, name: str, labels: dict[str, str] | None = None) -> None:
    """A namespace and its ``default`` ServiceAccount (no controller-manager makes it)."""
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels or {}},
    }
    plane.kubectl_ok("create", "-f", "-", stdin=json.dumps(namespace))
    plane.kubectl_ok("-n", name, "create", "serviceaccount", "default")


@dataclass
class Replica:
    identity: str
    port: int
    cert_dir: Path
    process: subprocess.Popen[str]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Operators:
    """``trellis operator run`` replicas against the control plane, and the Secret copier."""

    plane: ControlPlane
    root: Path
    kubeconfig: Path
    replicas: list[Replica] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _copier: threading.Thread | None = None

    def start_replica(self, identity: str) -> Replica:
        cert_dir = self.root / identity
        cert_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = self.root / f"{identity}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "trellis", "operator", "run",
                    f"--trust-domain={TRUST_DOMAIN}", f"--namespace={NAMESPACE}",
                    f"--identity={identity}", f"--kubeconfig={self.kubeconfig}",
                    "--webhook-host=127.0.0.1", f"--webhook-port={port}",
                    f"--webhook-cert-dir={cert_dir}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
        replica = Replica(identity, port, cert_dir, process, log)
        self.replicas.append(replica)
        return replica

    def lease_holder(self) -> str | None:
        lease = self.plane.kubectl(
            "-n", NAMESPACE, "get", "lease", "trellis-operator", "-o", "json"
        )
        if lease.returncode != 0:
            return None
        holder = json.loads(lease.stdout).get("spec", {}).get("holderIdentity")
        return str(holder) if holder else None

    def _copy_secret_forever(self) -> None:
        """The kubelet's Secret volume: the leader's webhook Secret, as files per replica."""
        import kubernetes

        core = kubernetes.client.CoreV1Api(self.plane.api_client())
        seen: dict[str, str] = {}
        while not self._stop.wait(0.5):
            try:
                secret = core.read_namespaced_secret("trellis-webhook-tls", NAMESPACE)
            except kubernetes.client.exceptions.ApiException:
                continue
            data: dict[str, str] = secret.data or {}
            if data == seen or "tls.crt" not in data:
                continue
            for replica in list(self.replicas):
                for name in ("tls.key", "tls.crt"):
                    target = replica.cert_dir / name
                    partial = target.with_suffix(".new")
                    partial.write_bytes(base64.b64decode(data[name]))
                    partial.chmod(0o600)
                    partial.rename(target)
            seen = data

    def start_copier(self) -> None:
        self._copier = threading.Thread(target=self._copy_secret_forever, daemon=True)
        self._copier.start()

    def webhook_url(self, replica: Replica, path: str = "/mutate") -> str:
        return f"https://{WEBHOOK_HOST}:{replica.port}{path}"

    def stop(self) -> str:
        for replica in self.replicas:
            replica.stop()
        self._stop.set()
        if self._copier is not None:
            self._copier.join(timeout=10)
        # Stopped replicas never hand the Lease back; the next module's need not wait it out.
        self.plane.kubectl(
            "-n", NAMESPACE, "delete", "lease", "trellis-operator", "--ignore-not-found"
        )
        logs = "\n".join(f"--- {r.identity}\n{r.output()[-4000:]}" for r in self.replicas)
        return logs


def webhook_serving(replica: Replica) -> bool:
    """The Deployment's readiness probe: HTTPS GET /healthz (not verified, as the kubelet)."""
    if replica.process.poll() is not None:
        raise AssertionError(f"{replica.identity} exited: {replica.output()[-2000:]}")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            f"https://127.0.0.1:{replica.port}/healthz", timeout=2, context=context
        ) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def serves_secret_certificate(plane: ControlPlane, replica: Replica) -> bool:
    """Whether a new handshake with ``replica`` gets the certificate of the webhook Secret
    (the one the caBundle the leader wrote first vouches for). Until then the API server
    refuses the webhook ("x509: certificate is valid for ..."), and pods created then."""
    from cryptography import x509

    found = plane.kubectl(
        "-n", NAMESPACE, "get", "secret", "trellis-webhook-tls", "-o", "jsonpath={.data.tls\\.crt}"
    )
    if found.returncode != 0 or not found.stdout:
        return False
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(("127.0.0.1", replica.port), timeout=2) as raw,
            context.wrap_socket(raw) as tls,
        ):
            served = tls.getpeercert(binary_form=True)
    except OSError:
        return False
    secret = x509.load_pem_x509_certificate(base64.b64decode(found.stdout))
    return served is not None and secret == x509.load_der_x509_certificate(served)


def webhook_ready(plane: ControlPlane, replica: Replica) -> bool:
    """Ready as the Deployment's probe says (which needs the mounted pair loaded), and
    serving the Secret's certificate: the mounted copy is the Secret's current one."""
    return webhook_serving(replica) and serves_secret_certificate(plane, replica)


def point_webhooks_at(plane: ControlPlane, url_base: str) -> None:
    """Replace each webhook's Service clientConfig by a ``url:`` to a replica on loopback
    (see controlplane.py: no cluster DNS or kube-proxy here), keeping the caBundle."""
    for kind, name, path in (
        ("mutatingwebhookconfiguration", "trellis-sidecar-injector", "/mutate"),
        ("validatingwebhookconfiguration", "trellis-validator", "/validate"),
    ):
        current = plane.get(kind, name)
        ops: list[dict[str, Any]] = []
        for index, hook in enumerate(current.get("webhooks") or []):
            service = hook.get("clientConfig", {}).get("service")
            if service is not None:
                ops.append({"op": "remove", "path": f"/webhooks/{index}/clientConfig/service"})
            # Each webhook keeps its own path (/mutate/cni for the CNI redirect mode).
            # (a second call finds the url the first one wrote, and reads the path back).
            url = hook.get("clientConfig", {}).get("url")
            hook_path = (
                service.get("path", path)
                if service is not None
                else urllib.parse.urlsplit(url).path
                if url
                else path
            )
            ops.append(
                {
                    "op": "add",
                    "path": f"/webhooks/{index}/clientConfig/url",
                    "value": url_base + hook_path,
                }
            )
        plane.kubectl_ok("patch", kind, name, "--type=json", "-p", json.dumps(ops))


@pytest.fixture(scope="module")
def operators(
    installed: Installed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operators]:
    """Two replicas, as the Deployment runs them; the webhook points at the first."""
    assert installed.apply.returncode == 0, installed.apply.stderr
    plane = installed.plane
    root = tmp_path_factory.mktemp("operators")
    ops = Operators(plane, root, plane.service_account_kubeconfig(NAMESPACE, "trellis-operator"))
    try:
        ops.start_copier()
        first = ops.start_replica("operator-a")
        ops.start_replica("operator-b")
        point_webhooks_at(plane, f"https://{WEBHOOK_HOST}:{first.port}")
        wait_for(
            lambda: ops.lease_holder() is not None, 60, "an operator replica to take the Lease"
        )
        for replica in ops.replicas:
            wait_for(
                lambda r=replica: webhook_ready(plane, r),
                60,
                f"{replica.identity}'s webhook serving the Secret's certificate",
            )
        yield ops
    finally:
        logs = ops.stop()
        if os.environ.get("TRELLIS_TEST_LOGS"):
            print(logs)
