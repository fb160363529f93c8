"""A real Kubernetes control plane on loopback: etcd, then kube-apiserver, then kubeconfigs.

What runs is what a cluster runs, minus the nodes: etcd with its own data folder, and
kube-apiserver with ``--authorization-mode=RBAC``, the admission plugins Kubernetes enables
by default (no ``--enable-admission-plugins``), a service-account signing key and
certificates made here with ``cryptography``. There is no kubelet, scheduler or
controller-manager: Pods are stored, never run, and nothing creates a namespace's
``default`` ServiceAccount, so the tests create the accounts their Pods name.

Webhooks. The API server reaches a webhook by the name in its ``clientConfig``; with no
cluster DNS and no kube-proxy a Service name leads nowhere. kube-apiserver therefore runs
in a private mount namespace whose ``/etc/hosts`` names ``trellis-operator.trellis-system
.svc`` as 127.0.0.1 (the address cluster DNS plus kube-proxy would lead to), and the
tests point the webhook configurations at ``https://trellis-operator.trellis-system.svc:
<port>/...`` with a ``url:`` clientConfig. The operator's own certificate and the caBundle
it manages are then checked by the API server exactly as in a cluster.

``stop`` ends both processes and removes the folder; nothing is left behind.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import free_port

__all__ = ["WEBHOOK_HOST", "ControlPlane", "ControlPlaneError", "start"]

WEBHOOK_HOST = "trellis-operator.trellis-system.svc"
ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT = 180.0  # kube-apiserver installs its CRD, RBAC and priority defaults first


class ControlPlaneError(RuntimeError):
    """The control plane did not come up; the message names the process and its last log."""


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class _Pki:
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls) -> _Pki:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trellis test cluster CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def issue(
        self,
        common_name: str,
        *,
        organizations: tuple[str, ...] = (),
        server: bool = False,
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            import ipaddress

            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.DNSName("kubernetes.default.svc"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(self.ca_key, hashes.SHA256())
        return _cert_pem(cert), _key_pem(key)


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver, and what a client needs to talk to them."""

    root: Path
    bin_dir: Path
    server: str
    ca_file: Path
    kubeconfig: Path  # system:masters, for set-up (kubectl, kubernetes client)
    service_account_key: ec.EllipticCurvePrivateKey
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # --- clients ------------------------------------------------------------------------

    def kubectl(
        self, *args: str, stdin: str | None = None, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl; the caller checks ``returncode`` (refusals are what some tests want)."""
        return subprocess.run(
            [
                str(self.bin_dir / "kubectl"),
                f"--kubeconfig={kubeconfig or self.kubeconfig}",
                *list(args),
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def kubectl_ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.kubectl(*args, stdin=stdin)
        if result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def get(self, *args: str) -> dict[str, Any]:
        """``kubectl get ... -o json`` decoded."""
        value = json.loads(self.kubectl_ok("get", *args, "-o", "json"))
        assert isinstance(value, dict)
        return value

    def api_client(self, kubeconfig: Path | None = None) -> Any:
        import kubernetes

        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(
            config_file=str(kubeconfig or self.kubeconfig), client_configuration=configuration
        )
        return kubernetes.client.ApiClient(configuration)

    def request_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str | None = None,
        pod: dict[str, Any] | None = None,
        seconds: int = 3600,
    ) -> str:
        """A TokenRequest answered by the API server (optionally bound to a stored Pod)."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if audience is not None:
            spec["audiences"] = [audience]
        if pod is not None:
            spec["boundObjectRef"] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            }
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        out = self.kubectl_ok(
            "create",
            "--raw",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            "-f",
            "-",
            stdin=json.dumps(body),
        )
        token = json.loads(out)["status"]["token"]
        assert isinstance(token, str)
        return token

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig that acts as ``system:serviceaccount:<namespace>:<name>``, so the
        manifests' RBAC, not system:masters, decides what that component may do."""
        token = self.request_token(namespace, name, seconds=86400)
        path = self.root / f"kubeconfig-{namespace}-{name}"
        _write(
            path, yaml.safe_dump(_kubeconfig(self.server, self.ca_file, {"token": token})).encode()
        )
        return path

    # --- lifecycle ----------------------------------------------------------------------

    def logs(self, name: str, lines: int = 20) -> str:
        try:
            text = (self.root / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        for name in ("kube-apiserver", "etcd"):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def _kubeconfig(server: str, ca_file: Path, user: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "current-context": "test",
    }


def _wait_http(
    url: str,
    context: ssl.SSLContext | None,
    proc: subprocess.Popen[bytes],
    what: str,
    plane: ControlPlane,
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ControlPlaneError(
                f"{what} exited with status {proc.returncode}: {plane.logs(what, 5)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise ControlPlaneError(f"{what} not ready after {START_TIMEOUT:.0f}s: {plane.logs(what, 5)}")


def _spawn(plane: ControlPlane, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    log = (plane.root / f"{name}.log").open("wb")
    try:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    finally:
        log.close()
    plane.processes[name] = proc
    return proc


def start(bin_dir: Path, root: Path) -> ControlPlane:
    """Start etcd and kube-apiserver under ``root`` (a fresh folder); wait until ready."""
    root.mkdir(parents=True)
    pki = _Pki.create()
    ca_file = _write(root / "ca.crt", _cert_pem(pki.ca_cert), 0o644)
    serving_crt, serving_key = pki.issue("kube-apiserver", server=True)
    admin_crt, admin_key = pki.issue("trellis-test-admin", organizations=("system:masters",))
    sa_key = ec.generate_private_key(ec.SECP256R1())
    # The API server reads SEC 1 ("EC PRIVATE KEY") and SubjectPublicKeyInfo, not PKCS #8.
    sa_key_file = _write(
        root / "sa.key",
        sa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )
    sa_pub_file = _write(
        root / "sa.pub",
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        0o644,
    )
    port = free_port()
    server = f"https://127.0.0.1:{port}"
    kubeconfig = _write(
        root / "kubeconfig",
        yaml.safe_dump(
            _kubeconfig(
                server,
                ca_file,
                {
                    "client-certificate": str(_write(root / "admin.crt", admin_crt)),
                    "client-key": str(_write(root / "admin.key", admin_key)),
                },
            )
        ).encode(),
    )
    plane = ControlPlane(root, bin_dir, server, ca_file, kubeconfig, sa_key)
    try:
        etcd_port, peer_port = free_port(), free_port()
        etcd = _spawn(
            plane,
            "etcd",
            [
                str(bin_dir / "etcd"),
                f"--data-dir={root / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--name=default",
                "--unsafe-no-fsync",  # a throw-away store: durability only costs the disk
                "--log-level=warn",
            ],
        )
        _wait_http(f"http://127.0.0.1:{etcd_port}/health", None, etcd, "etcd", plane)

        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").is_file() else ""
        hosts_file = _write(
            root / "hosts", f"{hosts.rstrip()}\n127.0.0.1 {WEBHOOK_HOST}\n".encode(), 0o644
        )
        apiserver = [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={root / 'apiserver'}",
            f"--tls-cert-file={_write(root / 'apiserver.crt', serving_crt)}",
            f"--tls-private-key-file={_write(root / 'apiserver.key', serving_key)}",
            f"--client-ca-file={ca_file}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={ISSUER}",
            f"--service-account-key-file={sa_pub_file}",
            f"--service-account-signing-key-file={sa_key_file}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            # The `kubernetes` Service's endpoints may not be loopback; nothing here uses it.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ]
        # A private mount namespace whose /etc/hosts names the webhook (module docstring).
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            unshare.insert(1, "--map-root-user")
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        proc = _spawn(
            plane, "kube-apiserver", [*unshare, "sh", "-c", script, str(hosts_file), *apiserver]
        )
        context = ssl.create_default_context(cafile=str(ca_file))
        context.load_cert_chain(root / "admin.crt", root / "admin.key")
        _wait_http(f"{server}/readyz", context, proc, "kube-apiserver", plane)
    except BaseException:
        plane.stop()
        raise
    return plane
