"""The trellis image, built from this checkout with podman (runc) and run for real.

The image is the one ``make image`` builds; the CA server, the node agent, the echo app
and two sidecars each run in a container of it, on the host's loopback
(``--network=host``, ports the test picks), with the Workload API socket in a directory
shared by the agent's and the sidecars' containers. The agent runs as root with the host's
pid namespace, as its DaemonSet does (``hostPID``, ``runAsUser: 0``); each sidecar runs
under a uid of its own, which its registration entry selects. The one stand-in is in the
CNI installer's test: folders in place of the node's CNI directories and a ServiceAccount
token no API server issued (no kubelet runs here; the token is only written, never used).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca.entries import parse_entries_yaml
from ca.keys import write_private_file
from ca.server.tokens import JoinTokenStore
from ca.spiffeid import TrustDomain
from mesh_operator.injection import InjectorConfig
from tests.support import wait_for
from trellis.up.identity import create_authorities
from trellis.up.processes import free_ports

from .build import (
    IMAGE,
    IMAGE_LABEL,
    REPOSITORY,
    ROOT,
    SOURCE,
    VERSION,
    build,
    image_id,
    image_label,
    podman,
)
from .conftest import Containers, run_once

IMAGE_USER = 65532  # the Containerfile's USER, the uid the manifests' pods run as
TRUST_DOMAIN = "example.org"
CLUSTER, NODE = "local", "node-a"
CLIENT_UID, ECHO_UID = 10002, 10003
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/client"
ECHO_ID = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/echo"
ECHO_TARGET_PORT = 8080
READY_TIMEOUT = 90.0  # a container's interpreter starting on two busy cores


def _trellis_images(document: Any) -> Iterator[str]:
    """Every image of a trellis container in a manifest, and every --sidecar-image."""
    if isinstance(document, dict):
        image = document.get("image")
        if isinstance(image, str) and "trellis" in image:
            yield image
        for value in document.values():
            yield from _trellis_images(value)
    elif isinstance(document, list):
        for value in document:
            yield from _trellis_images(value)
    elif isinstance(document, str) and document.startswith("--sidecar-image="):
        yield document.removeprefix("--sidecar-image=")


def test_manifests_and_the_injector_name_the_image_the_build_produces() -> None:
    named: dict[str, set[str]] = {}
    for path in sorted((ROOT / "manifests").rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            for image in _trellis_images(document):
                named.setdefault(image, set()).add(str(path.relative_to(ROOT)))
    assert set(named) == {IMAGE}, named
    assert len(set().union(*named.values())) >= 4  # CA, agent, operator, CNI installer
    assert InjectorConfig().image == IMAGE
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^IMAGE_REPOSITORY := {re.escape(REPOSITORY)}$", makefile, re.M)
    assert f"{REPOSITORY}:{VERSION}" == IMAGE


def test_trellis_version_runs_in_the_image(trellis_image: str) -> None:
    result = run_once(trellis_image, "--version")
    assert result.returncode == 0, result.stderr
    assert VERSION in result.stdout + result.stderr


def test_the_image_runs_as_a_non_root_user(trellis_image: str) -> None:
    result = run_once(
        trellis_image,
        "-c",
        "import os; print(os.getuid(), os.getgid())",
        options=["--entrypoint", "/opt/trellis/bin/python3"],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(IMAGE_USER), str(IMAGE_USER)]


def test_the_image_has_no_shell(trellis_image: str) -> None:
    for shell in ("/bin/sh", "/bin/bash", "/usr/bin/sh"):
        result = run_once(trellis_image, "-c", "true", options=["--entrypoint", shell])
        assert result.returncode != 0
        assert "no such file or directory" in result.stderr.lower(), result.stderr


def test_the_image_is_labelled_with_its_version_and_source(trellis_image: str) -> None:
    result = subprocess.run(
        podman("image", "inspect", "--format", "{{json .Labels}}", trellis_image),
        capture_output=True,
        text=True,
        check=True,
    )
    labels = json.loads(result.stdout)
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.source"] == SOURCE
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def test_the_image_is_built_again_only_when_its_inputs_change(trellis_image: str) -> None:
    """A source edited meanwhile changes the inputs, and then a new image is right; the
    same inputs must give the very image already built (no second build)."""
    inputs, before = image_label(trellis_image, IMAGE_LABEL), image_id(trellis_image)
    assert build() == trellis_image
    after = image_label(trellis_image, IMAGE_LABEL)
    assert after is not None
    if after == inputs:
        assert image_id(trellis_image) == before


# -- the mesh in containers ---------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for the socket (sun_path: 108 bytes), enterable by every uid."""
    path = Path(tempfile.mkdtemp(prefix="tr-img-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _entries() -> str:
    entries = [
        {
            "id": name,
            "spiffe_id": spiffe_id,
            "selectors": [f"unix:uid:{uid}"],
            "nodes": [NODE],
            "ttl": "1h",
        }
        for name, spiffe_id, uid in (("client", CLIENT_ID, CLIENT_UID), ("echo", ECHO_ID, ECHO_UID))
    ]
    text = yaml.safe_dump({"entries": entries}, sort_keys=False)
    parse_entries_yaml(text)
    return text


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:  # loopback http
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _await(containers: Containers, name: str, check: Any, what: str) -> None:
    def ready() -> bool:
        if not containers.running(name):
            raise AssertionError(f"{name} exited:\n{containers.all_logs()}")
        return bool(check())

    try:
        wait_for(ready, READY_TIMEOUT, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{containers.all_logs()}") from None


def _post(port: int, body: bytes) -> bytes:
    request = b"POST /echo HTTP/1.1\r\nHost: echo\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as s:
        s.sendall(request)
        while not answer.endswith(body):  # bounded: each recv times out after 10 s
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer


def test_ca_agent_and_sidecars_in_containers_carry_an_apps_traffic_over_mtls(
    containers: Containers, short_dir: Path
) -> None:
    (ca_port, attest_port, ca_metrics, agent_admin, echo_port) = free_ports(5)
    (echo_inbound, echo_admin, client_inbound, client_upstream, client_admin) = free_ports(5)
    ca_dir, sock_dir, etc = short_dir / "ca", short_dir / "sock", short_dir / "etc"
    for directory in (sock_dir, etc):
        directory.mkdir(mode=0o755)
    root_cert = create_authorities(ca_dir, TrustDomain(TRUST_DOMAIN), CLUSTER)
    shutil.copy(root_cert, etc / "root.pem")
    token, _ = JoinTokenStore(ca_dir / "clusters" / CLUSTER).create(NODE, ttl=300)
    write_private_file(etc / "join-token", token.encode())  # 0600, root's: the agent's
    (etc / "entries.yaml").write_text(_entries())
    for path in [ca_dir, *ca_dir.rglob("*")]:
        os.chown(path, IMAGE_USER, IMAGE_USER)  # the CA runs as the image's user
    socket_uri = "unix:///run/trellis/agent.sock"
    sidecars: dict[str, dict[str, Any]] = {
        "echo": {
            "mode": "explicit",
            "workload_api_socket": socket_uri,
            "spiffe_id": ECHO_ID,
            "admin": f"127.0.0.1:{echo_admin}",
            "inbound": {
                "listen": f"127.0.0.1:{echo_inbound}",
                "targets": {
                    ECHO_TARGET_PORT: {
                        "app": f"127.0.0.1:{echo_port}",
                        "allow": [{"exact": CLIENT_ID}],
                    }
                },
            },
        },
        "client": {
            "mode": "explicit",
            "workload_api_socket": socket_uri,
            "spiffe_id": CLIENT_ID,
            "admin": f"127.0.0.1:{client_admin}",
            "inbound": {"listen": f"127.0.0.1:{client_inbound}", "targets": {}},
            "upstreams": [
                {
                    "name": "echo",
                    "listen": f"127.0.0.1:{client_upstream}",
                    "target": f"echo.demo:{ECHO_TARGET_PORT}",
                    "endpoints": [f"127.0.0.1:{echo_inbound}"],
                    "spiffe_ids": [ECHO_ID],
                }
            ],
        },
    }
    for name, config in sidecars.items():
        (etc / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    host = ["--network=host"]
    ca = containers.start(
        "ca",
        [*host, "-v", f"{ca_dir}:/ca", "-v", f"{etc}/entries.yaml:/etc/trellis/entries.yaml:ro"],
        [
            "ca", "serve", "--dir", "/ca", "--cluster", CLUSTER,
            "--listen", f"127.0.0.1:{ca_port}", "--attest-listen", f"127.0.0.1:{attest_port}",
            "--bundle-listen", "off", "--metrics-listen", f"127.0.0.1:{ca_metrics}",
            "--entries", "/etc/trellis/entries.yaml", "--poll-interval", "1",
        ],
    )  # fmt: skip
    _await(containers, ca, lambda: _http_ok(f"http://127.0.0.1:{ca_metrics}/metrics"), "the CA")
    agent = containers.start(
        "agent",
        [
            *host, "--pid=host", "--user", "0", "--cap-drop=all",
            "-v", f"{sock_dir}:/run/trellis",
            "-v", f"{etc / 'root.pem'}:/etc/trellis/root.pem:ro",
            "-v", f"{etc / 'join-token'}:/etc/trellis/join-token:ro",
        ],
        [
            "agent", "--socket", "/run/trellis/agent.sock", "--node", NODE,
            "--ca", f"127.0.0.1:{ca_port}", "--ca-attest", f"127.0.0.1:{attest_port}",
            "--trust-bundle", "/etc/trellis/root.pem",
            "--join-token-file", "/etc/trellis/join-token", "--data-dir", "/tmp/agent",
            "--admin", f"127.0.0.1:{agent_admin}", "--sync-interval", "1s", "--backoff-cap", "2s",
        ],
    )  # fmt: skip
    echo = containers.start("echo", host, ["demo", "echo", "--listen", f"127.0.0.1:{echo_port}"])
    _await(
        containers, agent, lambda: _http_ok(f"http://127.0.0.1:{agent_admin}/readyz"), "the agent"
    )
    _await(containers, echo, lambda: _accepts(echo_port), "the echo app")
    names = {}
    for name, uid in (("echo", ECHO_UID), ("client", CLIENT_UID)):
        names[name] = containers.start(
            f"sidecar-{name}",
            [
                *host, "--user", f"{uid}:{uid}", "-v", f"{sock_dir}:/run/trellis",
                "-v", f"{etc / (name + '.yaml')}:/etc/trellis/sidecar.yaml:ro",
                "-e", f"SPIFFE_ENDPOINT_SOCKET={socket_uri}",
            ],
            ["sidecar", "--config", "/etc/trellis/sidecar.yaml"],
        )  # fmt: skip
    for name, admin in (("echo", echo_admin), ("client", client_admin)):
        _await(
            containers,
            names[name],
            lambda admin=admin: _http_ok(f"http://127.0.0.1:{admin}/readyz"),
            f"the {name} sidecar holding its SVID",
        )

    body = b"through two sidecars in containers"
    answer = _post(client_upstream, body)
    assert answer.startswith(b"HTTP/1.1 200"), (answer, containers.all_logs())
    assert answer.endswith(body)
    # The hop between the sidecars was mutual TLS 1.3, seen by both ends.
    for admin in (client_admin, echo_admin):
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert re.search(r'^tls_version_total\{version="TLSv1\.3"\} [1-9]', metrics, re.M), metrics


# -- the CNI DaemonSet's installer ---------------------------------------------------------


def _cni_installer() -> dict[str, Any]:
    path = ROOT / "manifests" / "cni" / "daemonset.yaml"
    (daemonset,) = (
        d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "DaemonSet"
    )
    (install,) = daemonset["spec"]["template"]["spec"]["containers"]
    return dict(install)


def test_the_cni_installer_leaves_a_plugin_on_the_host_that_runs_from_its_copied_location(
    containers: Containers, short_dir: Path
) -> None:
    """The DaemonSet's own command, in the image, against stand-ins for the node's CNI
    directories and the pod's ServiceAccount; then the plugin it installed is run on this
    host, outside any container, the way a container runtime execs a CNI plugin."""
    install = _cni_installer()
    assert install["image"] == IMAGE
    host_bin, host_conf, account = short_dir / "bin", short_dir / "net.d", short_dir / "sa"
    for directory in (host_bin, host_conf, account):
        directory.mkdir()
    conflist = host_conf / "10-main.conflist"
    main_plugin = {"type": "bridge", "bridge": "cni0"}
    conflist.write_text(
        json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": [main_plugin]})
    )
    (account / "token").write_text("a-service-account-token")
    (account / "ca.crt").write_text(
        "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n"
    )
    mounts = {
        host_bin: "/host/opt/cni/bin",
        host_conf: "/host/etc/cni/net.d",
        account: "/var/run/secrets/kubernetes.io/serviceaccount",
    }
    options = ["--network=none", "--entrypoint", json.dumps(install["command"])]
    user = install.get("securityContext", {}).get("runAsUser")
    if user is not None:  # else the image's own user, as the kubelet would
        options += ["--user", str(user)]
    options += ["-e", "KUBERNETES_SERVICE_HOST=10.96.0.1", "-e", "KUBERNETES_SERVICE_PORT=443"]
    for source, target in mounts.items():
        options += ["-v", f"{source}:{target}"]
    installer = containers.start("cni-install", options, install["args"])

    def chained() -> bool:
        plugins = json.loads(conflist.read_text()).get("plugins", [])
        return any(p.get("type") == "trellis-cni" for p in plugins)

    _await(containers, installer, chained, "trellis-cni chained into the node's conflist")
    assert (host_conf / "trellis-cni.kubeconfig").is_file()
    plugin = host_bin / "trellis-cni"
    assert os.access(plugin, os.X_OK)

    # The host's view: its own /bin/sh runs the wrapper, nothing of this test's Python
    # (an empty environment but CNI's variables, as a runtime passes them).
    result = subprocess.run(
        [str(plugin)],
        input=json.dumps({"cniVersion": "1.0.0", "name": "k8s", "type": "trellis-cni"}),
        env={"CNI_COMMAND": "VERSION", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (result.stderr, containers.all_logs())
    assert "1.0.0" in json.loads(result.stdout)["supportedVersions"]
