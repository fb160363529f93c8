"""Outbound passthrough for real: an app in a network namespace of our own reaches a plain
TCP server outside the mesh through its transparent sidecar, or is refused, by the mesh
registry the operator publishes in the policy document.

Inside the namespace (loopback only) 127.0.0.2 plays a mesh pod (echo app on :18080 behind
sidecar B on :15008) and 192.0.2.10 (added to the namespace's loopback device) a
destination outside the mesh: a plain TCP echo server on :18081 with no sidecar. Sidecar A
(transparent, root = the proxy UID the rules exempt) reads a policy document whose
``mesh`` section lists only 127.0.0.2/32; the app runs as UID 65534 behind
`trellis sidecar iptables`; an echo on 127.0.0.1:18082 plays another container of its pod.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .conftest import CLIENT, ECHO
from .harness import ECHO as ECHO_APP
from .harness import Pki, Procs, env, wait_for
from .test_transparent import _curl, _in, netns  # noqa: F401 -- the netns fixture

MESH_POD = "127.0.0.2"
# RFC 5737 TEST-NET-1, put on the namespace's own loopback device: a non-loopback address
# (the pod's loopback is exempt from REGISTRY_ONLY) that exists only inside the test.
OUTSIDE = "192.0.2.10"

CALL = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
payload = b"outside-or-in" * 100
try:
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
except OSError as exc:
    print(f"refused {type(exc).__name__}")
else:
    print("echoed" if data == payload else f"closed after {len(data)} bytes")
"""


def _document(policy: str) -> str:
    return json.dumps(
        {
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "SidecarPolicy",
            "policies": [],
            "mesh": {"outboundTrafficPolicy": policy, "destinations": [f"{MESH_POD}/32"]},
        }
    )


def _call(ns: str, host: str, port: int) -> str:
    return subprocess.run(
        _in(
            ns, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            sys.executable, "-c", CALL, host, str(port),
        ),
        capture_output=True, text=True, timeout=30, check=False,
    ).stdout.strip()  # fmt: skip


def _metrics(ns: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in _curl(ns, "http://127.0.0.1:15000/metrics").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _start_mesh(ns: str, procs: Procs, pki: Pki, policy: Path) -> None:
    work = procs.workdir
    subprocess.run(_in(ns, "ip", "addr", "add", f"{OUTSIDE}/32", "dev", "lo"), check=True)
    rules = subprocess.run(
        _in(
            ns, sys.executable, "-m", "trellis", "sidecar", "iptables", "--proxy-uid=0",
            "--outbound-port=15001", "--inbound-port=15008", "--exclude-inbound-ports=15000",
            "--ipv6=off",
        ),
        capture_output=True, text=True, timeout=30, check=False, env=env(),
    )  # fmt: skip
    assert rules.returncode == 0, rules.stderr
    procs.start("echo-mesh", _in(ns, sys.executable, str(ECHO_APP), "18080", MESH_POD))
    procs.start("echo-outside", _in(ns, sys.executable, str(ECHO_APP), "18081", OUTSIDE))
    # Another container of the app's own pod, on the pod's loopback.
    procs.start("echo-local", _in(ns, sys.executable, str(ECHO_APP), "18082", "127.0.0.1"))
    configs: dict[str, dict[str, Any]] = {
        "b": {
            "svid_dir": str(pki.write(work / "svid-b", ECHO)),
            "admin": f"{MESH_POD}:15000",
            "inbound": {
                "listen": f"{MESH_POD}:15008",
                "targets": {18080: {"app": f"{MESH_POD}:18080"}},
            },
        },
        "a": {
            "mode": "transparent",
            "svid_dir": str(pki.write(work / "svid-a", CLIENT)),
            "admin": "127.0.0.1:15000",
            "outbound": "127.0.0.1:15001",
            "inbound": {"listen": "127.0.0.1:15008"},
            "policy_file": str(policy),
        },
    }
    for name, config in configs.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        procs.start(
            f"sidecar-{name}",
            _in(ns, sys.executable, "-m", "trellis", "sidecar", "--config", str(path)),
        )

    def ready() -> bool:
        try:
            return all(
                _curl(ns, f"http://{host}:15000/readyz").strip() == "ready"
                for host in ("127.0.0.1", MESH_POD)
            )
        except subprocess.CalledProcessError:
            return False

    wait_for(ready, 30, "both sidecars ready in the namespace")


def _rewrite(path: Path, text: str) -> None:
    """Replace the document as a ConfigMap update does, with an mtime the reload sees
    change even on a filesystem with coarse timestamps."""
    before = path.stat().st_mtime
    path.write_text(text)
    os.utime(path, (before + 2, before + 2))


def test_an_app_reaches_a_destination_outside_the_mesh_by_passthrough_until_registry_only(
    netns: str,  # noqa: F811
    procs: Procs,
    pki: Pki,
) -> None:
    policy = procs.workdir / "policy.json"
    policy.write_text(_document("ALLOW_ANY"))
    _start_mesh(netns, procs, pki, policy)

    # ALLOW_ANY: the plain server outside the mesh answers, spliced unchanged and counted.
    assert _call(netns, OUTSIDE, 18081) == "echoed"
    # The mesh pod is still reached over mTLS CONNECT, as before.
    assert _call(netns, MESH_POD, 18080) == "echoed"
    metrics = _metrics(netns)
    assert metrics['trellis_sidecar_passthrough_total{outcome="forwarded"}'] == 1
    assert metrics['trellis_sidecar_passthrough_total{outcome="refused"}'] == 0
    assert metrics['trellis_sidecar_streams_total{direction="outbound",outcome="ok"}'] == 1
    b = _curl(netns, f"http://{MESH_POD}:15000/metrics")
    assert 'trellis_sidecar_policy_decisions_total{decision="allow"} 1.0' in b

    # REGISTRY_ONLY, reloaded live: the same connection is reset and counted as refused.
    _rewrite(policy, _document("REGISTRY_ONLY"))

    def registry_only() -> bool:
        described = json.loads(_curl(netns, "http://127.0.0.1:15000/config"))
        mesh = described.get("mesh") or {}
        return bool(mesh.get("outboundTrafficPolicy") == "REGISTRY_ONLY")

    wait_for(registry_only, 15, "the REGISTRY_ONLY document reloaded")
    outcome = _call(netns, OUTSIDE, 18081)
    assert outcome.startswith("refused") or outcome == "closed after 0 bytes", outcome
    assert _call(netns, MESH_POD, 18080) == "echoed"
    # The pod's own loopback is not the world: still reached under REGISTRY_ONLY.
    assert _call(netns, "127.0.0.1", 18082) == "echoed"
    metrics = _metrics(netns)
    assert metrics['trellis_sidecar_passthrough_total{outcome="refused"}'] == 1
    assert metrics['trellis_sidecar_passthrough_total{outcome="forwarded"}'] == 2
    assert metrics['trellis_sidecar_streams_total{direction="outbound",outcome="ok"}'] == 2


def test_excluded_and_not_included_ranges_never_reach_the_sidecar(
    netns: str,  # noqa: F811
    procs: Procs,
) -> None:
    """No sidecar runs at all: a connection the rules redirect finds nothing on :15001 and
    is refused, so an answer proves the connection left the redirect untouched."""
    excluded, included, other = "192.0.2.10", "192.0.2.11", "192.0.2.12"
    for address in (excluded, included, other):
        subprocess.run(_in(netns, "ip", "addr", "add", f"{address}/32", "dev", "lo"), check=True)
        procs.start(f"echo-{address}", _in(netns, sys.executable, str(ECHO_APP), "18081", address))

    def install(*flags: str) -> None:
        rules = subprocess.run(
            _in(
                netns, sys.executable, "-m", "trellis", "sidecar", "iptables", "--proxy-uid=0",
                "--ipv6=off", *flags,
            ),
            capture_output=True, text=True, timeout=30, check=False, env=env(),
        )  # fmt: skip
        assert rules.returncode == 0, rules.stderr

    install(f"--exclude-outbound-ip-ranges={excluded}/32")
    wait_for(lambda: _call(netns, excluded, 18081) == "echoed", 15, "the excluded echo")
    assert _call(netns, other, 18081).startswith("refused")  # redirected to :15001

    # Rerun with an include list (the plan replaces its chains): only that range is taken.
    install(f"--include-outbound-ip-ranges={included}/32")
    assert _call(netns, other, 18081) == "echoed"
    assert _call(netns, excluded, 18081) == "echoed"
    assert _call(netns, included, 18081).startswith("refused")
