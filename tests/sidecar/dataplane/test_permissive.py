"""Permissive mode for real: callers without TLS let through to a declared app port, mesh
callers still held to mTLS and the policy.

The plaintext cases run in a network namespace of our own (loopback only): 127.0.0.2 is
the pod, an iptables rule in the namespace redirects what UID 65534 (the caller outside
the mesh) dials there to the sidecar's inbound port, as the pod's inbound rule does in a
cluster, so the sidecar reads the port the caller meant from SO_ORIGINAL_DST. The apps are
small TCP servers that log every connection they accept, so "no byte reached the app" is
what they saw, not what the sidecar claims. The mesh-caller case runs on the host's
loopback with a real mTLS client.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .conftest import CLIENT, ECHO, INTRUDER
from .harness import Pki, Procs, RawClient, free_port, start_echo, start_sidecar, wait_for
from .test_transparent import _curl, _in, netns  # noqa: F401  (netns is a fixture)

POD = "127.0.0.2"
APP, BYSTANDER = 18080, 18081  # the declared target, and a port nobody declared

LOGGING_APP = """
import socket, sys
port, log = int(sys.argv[1]), sys.argv[2]
server = socket.create_server((sys.argv[3], port))
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    with open(log, "a") as f:
        f.write("accepted\\n")
    data = b""
    conn.settimeout(10)
    try:
        while chunk := conn.recv(65536):
            data += chunk
        conn.sendall(data)
    except OSError:
        pass
    conn.close()
"""

CALLER = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
        s.sendall(b"hello without tls")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    print("echoed" if data == b"hello without tls" else f"closed {data!r}")
except ConnectionError as exc:
    print(f"closed {type(exc).__name__}")
"""


def _policy(mtls: str, **extra: Any) -> str:
    return json.dumps({"policies": [{"selector": {}, "mtls": mtls, "allow": [], **extra}]})


def _plaintext_call(ns: str, port: int) -> str:
    """One connection from UID 65534 (redirected) to the pod's ``port``, without TLS."""
    result = subprocess.run(
        _in(
            ns, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            sys.executable, "-c", CALLER, POD, str(port),
        ),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _sockets(pid: int) -> int:
    """How many sockets the process holds open."""
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed since listed
            count += os.readlink(fd).startswith("socket:")
    return count


def _accepted(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _metrics(ns: str) -> dict[str, float]:
    text = _curl(ns, "http://127.0.0.1:15000/metrics")
    return {
        name: float(value)
        for line in text.splitlines()
        if line and not line.startswith("#")
        for name, _, value in [line.rpartition(" ")]
    }


def test_a_plaintext_caller_reaches_a_permissive_workload_and_is_refused_once_it_is_strict(
    netns: str,  # noqa: F811
    procs: Procs,
    pki: Pki,
) -> None:
    work = procs.workdir
    work.chmod(0o755)  # the apps write their logs here; the caller runs as UID 65534
    subprocess.run(
        _in(
            netns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", POD,
            "-m", "owner", "--uid-owner", "65534", "-j", "REDIRECT", "--to-ports", "15008",
        ),
        check=True,
    )  # fmt: skip
    script = work / "app.py"
    script.write_text(LOGGING_APP)
    logs = {port: work / f"seen-{port}.txt" for port in (APP, BYSTANDER)}
    apps = [
        procs.start(
            f"app-{port}", _in(netns, sys.executable, str(script), str(port), str(log), POD)
        )
        for port, log in logs.items()
    ]
    policy = work / "policy.json"
    # No ports listed: every port permissive, so only the declared-target rule stands
    # between a plaintext caller and the bystander.
    policy.write_text(_policy("PERMISSIVE"))
    config = {
        "mode": "transparent",
        "svid_dir": str(pki.write(work / "svid", ECHO)),
        "admin": "127.0.0.1:15000",
        "outbound": "127.0.0.1:15001",
        "inbound": {"listen": "127.0.0.1:15008", "targets": {APP: {"app": f"{POD}:{APP}"}}},
        "policy_file": str(policy),
    }
    (work / "sidecar.yaml").write_text(yaml.safe_dump(config))
    sidecar = procs.start(
        "sidecar",
        _in(
            netns,
            sys.executable,
            "-m",
            "trellis",
            "sidecar",
            "--config",
            str(work / "sidecar.yaml"),
        ),
    )

    def ready() -> bool:
        try:
            return _curl(netns, "http://127.0.0.1:15000/readyz").strip() == "ready"
        except subprocess.CalledProcessError:
            return False

    wait_for(ready, 30, "the sidecar ready in the namespace")
    wait_for(lambda: all("listening" in app.output() for app in apps), 30, "the apps listening")
    idle = _sockets(sidecar.popen.pid)

    assert _plaintext_call(netns, APP) == "echoed"
    assert _accepted(logs[APP]) == 1
    # Both halves closed, so the relay let go of both sockets (TCP states alone cannot show
    # it: a socket shut both ways sits in TIME-WAIT whether or not its descriptor is open).
    wait_for(lambda: _sockets(sidecar.popen.pid) == idle, 10, "the relay's sockets closed")
    assert _metrics(netns)['trellis_sidecar_plaintext_accepted_total{port="18080"}'] == 1

    # Issue 12's open-proxy rule holds without TLS too: an undeclared port is closed.
    assert _plaintext_call(netns, BYSTANDER).startswith("closed")
    assert _accepted(logs[BYSTANDER]) == 0
    refused = 'trellis_sidecar_plaintext_refused_total{reason="undeclared_port"}'
    assert _metrics(netns)[refused] == 1

    # Strict, reloaded live: the same caller is closed before any byte reaches the app.
    policy.write_text(_policy("STRICT"))

    def strict() -> bool:
        described = json.loads(_curl(netns, "http://127.0.0.1:15000/config"))
        return bool(described["inbound"]["mtls"]["any_port"] == ["STRICT"])

    wait_for(strict, 15, "the strict policy reloaded")
    assert _plaintext_call(netns, APP).startswith("closed")
    assert _accepted(logs[APP]) == 1  # still only the permissive call
    assert _metrics(netns)['trellis_sidecar_plaintext_accepted_total{port="18080"}'] == 1


def test_a_mesh_caller_of_a_permissive_workload_keeps_mtls_and_policy(
    procs: Procs, pki: Pki
) -> None:
    """The first bytes of a TLS ClientHello go to the mTLS session: the policy's refused
    identity still gets 403, the allowed one 200, and a plaintext caller that was not
    redirected (no original destination but the sidecar itself) is closed."""
    echo = start_echo(procs)
    policy = procs.workdir / "policy.json"
    policy.write_text(_policy("PERMISSIVE", ports=[8080], allow=[{"exact": CLIENT}]))
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "mode": "transparent",
            "outbound": f"127.0.0.1:{free_port()}",
            "svid_dir": str(pki.write(procs.workdir / "svid-b", ECHO)),
            "inbound": {"targets": {8080: {"app": f"127.0.0.1:{echo}"}}},
            "policy_file": str(policy),
        },
    )
    assert b.describe()["inbound"]["mtls"]["ports"] == {"8080": ["PERMISSIVE"]}
    connect = [(":method", "CONNECT"), (":authority", "echo:8080")]
    intruder = RawClient(b.inbound_port, pki.write(procs.workdir / "svid-i", INTRUDER))
    client = RawClient(b.inbound_port, pki.write(procs.workdir / "svid-c", CLIENT))
    try:
        assert intruder.request(connect) == 403
        assert client.request(connect) == 200
    finally:
        intruder.close()
        client.close()
    with socket.create_connection(("127.0.0.1", b.inbound_port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):  # closed, or reset: either way
            assert plain.recv(100) == b""
    metrics = b.metrics()
    assert metrics['trellis_sidecar_policy_decisions_total{decision="deny"}'] == 1
    assert metrics['trellis_sidecar_policy_decisions_total{decision="allow"}'] == 1
    refused = sum(
        v for k, v in metrics.items() if k.startswith("trellis_sidecar_plaintext_refused_total{")
    )
    assert refused == 1
    assert metrics['trellis_sidecar_plaintext_accepted_total{port="8080"}'] == 0


def test_permissive_mode_in_explicit_mode_stays_strict_and_says_why(procs: Procs, pki: Pki) -> None:
    """Without a redirect there is no original destination to name the app port a caller
    without TLS meant, so an explicit-mode sidecar keeps refusing such callers and warns."""
    echo = start_echo(procs)
    policy = procs.workdir / "policy.json"
    policy.write_text(_policy("PERMISSIVE"))
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "svid_dir": str(pki.write(procs.workdir / "svid-b", ECHO)),
            "inbound": {"targets": {8080: {"app": f"127.0.0.1:{echo}"}}},
            "policy_file": str(policy),
        },
    )
    assert b.describe()["inbound"]["mtls"] == {"ports": {}, "any_port": []}
    assert "mtls PERMISSIVE needs mode: transparent" in b.proc.output()
    with socket.create_connection(("127.0.0.1", b.inbound_port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            plain.recv(100)  # a TLS alert at most: the TLS layer closes it, as when strict
    assert b.metrics()['trellis_sidecar_plaintext_accepted_total{port="8080"}'] == 0
