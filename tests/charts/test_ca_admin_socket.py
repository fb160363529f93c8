"""The CA's admin socket in a cluster: ``kubectl -n NS exec deploy/trellis-ca -- trellis ca
entries list`` works, from the manifests and from the chart alike.

The image has no shell, so the exec'd ``trellis`` must find the socket by itself: the CA
container passes ``--admin-socket`` on an emptyDir (the root filesystem is read-only) and
names the same path in ``TRELLIS_CA_ADMIN_SOCKET``, which ``ca entries list``, ``agents list``
and ``trellis check`` read when ``--socket`` is not given.

The exec itself is not run here: the API server hands ``pods/exec`` to the node's kubelet,
and the test control plane runs none (as for ``pods/portforward`` in
``tests/trellis/test_proxy_cli.py``). What the exec'd command depends on is checked instead,
with real parts: the rendered container's flags parsed by ``ca serve``'s own parser, and a
real ``ca serve`` with that flag whose socket a real ``trellis ca entries list`` finds with the
container's environment alone. The emptyDir is a folder re-rooted under a temporary
directory (a kubelet would bind it at its ``mountPath``); that re-rooting is the one
stand-in, since the test cannot create ``/run/trellis-ca`` on the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ca.server.admin_cli import SOCKET_ENV
from tests.ca.agent.test_e2e_pyspiffe import WEB, Mesh, _make_ca_dir, write_web_entry
from tests.manifests import kustomize
from trellis.cli import build_parser

from .conftest import MANIFESTS, Render

SUN_PATH_MAX = 107  # bytes of a Unix socket path, without the terminating NUL (unix(7))


def _ca_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "trellis-ca"
    ]
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


@pytest.fixture(params=["kustomize", "helm"])
def ca_pod(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "kustomize":
        return _ca_pod(kustomize.render(MANIFESTS))
    render: Render = request.getfixturevalue("render")  # skipped until `make helm`
    return _ca_pod(render({}))


def _admin_socket(container: dict[str, Any]) -> str:
    (flag,) = [a for a in container["args"] if a.startswith("--admin-socket=")]
    return str(flag.partition("=")[2])


def test_the_ca_serves_its_admin_socket_on_a_writable_volume_named_in_its_environment(
    ca_pod: dict[str, Any],
) -> None:
    (ca,) = ca_pod["containers"]
    socket = _admin_socket(ca)
    assert socket.startswith("/") and len(socket.encode()) <= SUN_PATH_MAX
    # The flags parse as ca serve parses them (the container's command is `trellis`).
    assert ca["command"] == ["trellis"]
    args = build_parser().parse_args(ca["args"])
    assert args.admin_socket == Path(socket)
    # The socket's folder is an emptyDir mounted writable: the root filesystem is not.
    assert ca["securityContext"]["readOnlyRootFilesystem"] is True
    (mount,) = [m for m in ca["volumeMounts"] if m["mountPath"] == str(Path(socket).parent)]
    assert not mount.get("readOnly", False)
    (volume,) = [v for v in ca_pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume
    # Only the admin socket lives there: not shared with /tmp or a secret.
    assert [m for m in ca["volumeMounts"] if m["name"] == mount["name"]] == [mount]
    # An exec'd `trellis ca entries list` (or `trellis check`) finds it without --socket.
    assert {"name": SOCKET_ENV, "value": socket} in ca["env"]


@pytest.fixture
def pod_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tr-pod-"))  # short: the socket path fits sun_path
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_an_exec_with_the_containers_environment_lists_the_entries_of_a_real_ca(
    pod_root: Path,
) -> None:
    (ca,) = _ca_pod(kustomize.render(MANIFESTS))["containers"]
    socket = pod_root / _admin_socket(ca).lstrip("/")
    socket.parent.mkdir(parents=True)  # the emptyDir
    environment = {e["name"]: str(pod_root / e["value"].lstrip("/")) for e in ca["env"]}
    workdir = pod_root / "ca-work"
    _make_ca_dir(workdir / "ca")
    write_web_entry(workdir / "entries.yaml")
    mesh = Mesh(workdir, pod_root / "agent.sock")

    def exec_in_pod(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trellis", *argv],
            capture_output=True,
            text=True,
            cwd=MANIFESTS.parent,
            timeout=60,
            check=False,
            env={k: v for k, v in os.environ.items() if k != SOCKET_ENV} | environment,
        )

    try:
        mesh.start_ca(mint_token=False, extra=["--admin-socket", str(socket)])
        listed = exec_in_pod("ca", "entries", "list")  # no --socket
        checked = exec_in_pod("check")  # the CA's checks, from inside its pod
    finally:
        mesh.stop()
    assert listed.returncode == 0, listed.stderr
    assert WEB in listed.stdout
    assert checked.stdout.splitlines()[0].startswith("✔ CA reachable: "), checked.stdout
