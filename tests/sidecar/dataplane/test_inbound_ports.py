"""Inbound reaches declared ports only, and the admin port stays on loopback: real sidecar
processes, real mTLS clients, real listeners standing in for what else runs on the node."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from .conftest import CLIENT, ECHO, INTRUDER
from .harness import Pki, Procs, RawClient, free_port, start_echo, start_sidecar


def _connect(authority: str) -> list[tuple[str, str]]:
    return [(":method", "CONNECT"), (":authority", authority)]


def _accepted(listener: socket.socket) -> int:
    """How many connections wait in the listener's queue (it never accepts on its own)."""
    count = 0
    for _ in range(100):
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1
    return count


def test_a_refused_identity_cannot_reach_an_undeclared_port_through_the_sidecar(
    procs: Procs, pki: Pki
) -> None:
    """The probe from the report: the default configuration once forwarded a CONNECT for
    any port no target listed to 127.0.0.1:PORT, so a caller the policy refuses for the app
    reached the agent's admin port, the CA's ports and the sidecar's own admin."""
    bystander = socket.create_server(("127.0.0.1", 0))  # the agent's admin port, say
    bystander.setblocking(False)
    port = bystander.getsockname()[1]
    echo = start_echo(procs)
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "svid_dir": str(pki.write(procs.workdir / "svid-b", ECHO)),
            "inbound": {
                "targets": {8080: {"app": f"127.0.0.1:{echo}", "allow": [{"exact": CLIENT}]}}
            },
        },
    )
    intruder = RawClient(b.inbound_port, pki.write(procs.workdir / "svid-i", INTRUDER))
    client = RawClient(b.inbound_port, pki.write(procs.workdir / "svid-c", CLIENT))
    try:
        assert intruder.request(_connect("echo:8080")) == 403  # the policy refuses it
        for authority in (f"x:{port}", f"127.0.0.1:{port}", f"echo:{b.admin_port}"):
            assert intruder.request(_connect(authority)) == 404, authority
        # An identity the app admits gets no further off the declared port.
        assert client.request(_connect(f"x:{port}")) == 404
        assert client.request(_connect("echo:8080")) == 200
    finally:
        intruder.close()
        client.close()
    try:
        assert _accepted(bystander) == 0
    finally:
        bystander.close()
    metrics = b.metrics()
    assert metrics['trellis_sidecar_connect_requests_rejected_total{status="404"}'] == 4
    assert metrics['trellis_sidecar_policy_decisions_total{decision="deny"}'] == 1
    assert metrics['trellis_sidecar_app_connections_total{direction="inbound"}'] == 1


def test_the_sidecars_own_admin_port_is_refused_even_when_declared(procs: Procs, pki: Pki) -> None:
    admin = free_port()
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "svid_dir": str(pki.write(procs.workdir / "svid-b", ECHO)),
            "admin": f"127.0.0.1:{admin}",
            "inbound": {"targets": {8080: {"app": f"127.0.0.1:{admin}"}}},
        },
        wait=False,
    )
    assert b.proc.popen.wait(30) == 1
    assert b.proc.output().strip().splitlines() == [
        f"trellis: error: sidecar configuration: inbound.targets.8080: 127.0.0.1:{admin} is "
        "the sidecar's own admin port, which is never forwarded"
    ]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_admin_binds_loopback_and_the_pod_address_serves_only_metrics_and_probes(
    procs: Procs, pki: Pki
) -> None:
    """127.0.0.2 plays the pod's address (--listen-host), as the injector's sidecar has it."""
    admin, health = free_port(), free_port()
    b = start_sidecar(
        procs,
        "sidecar-b",
        {"svid_dir": str(pki.write(procs.workdir / "svid-b", ECHO)), "admin": f"127.0.0.1:{admin}"},
        extra_args=[
            f"--admin-port={admin}",
            f"--health-port={health}",
            "--listen-host=127.0.0.2",
        ],
    )
    pod = f"http://127.0.0.2:{health}"
    assert _get(f"{pod}/metrics") == 200
    assert _get(f"{pod}/healthz") == 200
    assert _get(f"{pod}/readyz") == 200
    for path in ("/config", "/", "/config/", "/debug"):
        assert _get(f"{pod}{path}") == 404, path
    listeners = b.describe()["listeners"]  # on the admin port, from loopback
    assert listeners["admin"] == f"127.0.0.1:{admin}"
    assert listeners["health"] == f"127.0.0.2:{health}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", admin), timeout=5).close()
