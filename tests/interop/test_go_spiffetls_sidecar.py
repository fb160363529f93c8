"""go-spiffe's spiffetls against Trellis sidecars, every SVID from one Trellis agent.

Real processes: ``trellis ca serve`` -> ``trellis agent`` -> a ``trellis sidecar`` (its
SVID from the agent's Workload API) and the Go ``spiffetls`` program (go-spiffe's
X509Source on the same agent, ``tlsconfig.AuthorizeID``/``AuthorizeMemberOf``), which
speaks the sidecar's inbound protocol: HTTP/2 CONNECT over mutual TLS with ALPN h2.
The agent tells them apart by executable (``unix:path`` selectors), so each has its own
SPIFFE ID.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.ca.agent.test_e2e_pyspiffe import Mesh
from tests.sidecar.dataplane.harness import (
    Proc,
    Procs,
    Sidecar,
    roundtrip,
    start_echo,
    start_sidecar,
)
from tests.support import free_port, wait_for

from .conftest import GoPeers, MeshFactory, by_path, entries_yaml

GO_ID = "spiffe://example.org/ns/default/sa/go-spiffe"
SIDECAR_ID = "spiffe://example.org/ns/default/sa/trellis-sidecar"
OTHER_ID = "spiffe://example.org/ns/default/sa/someone-else"
TARGET = "echo.default:8080"
RUN_TIMEOUT = 40.0


@dataclass(frozen=True)
class Setup:
    peers: GoPeers
    mesh: Mesh
    procs: Procs


@pytest.fixture
def setup(go_peers: GoPeers, agent_mesh: MeshFactory, procs: Procs) -> Iterator[Setup]:
    mesh = agent_mesh(
        entries_yaml(
            ("go", GO_ID, [by_path(go_peers.spiffetls)], []),
            ("sidecar", SIDECAR_ID, [by_path(sys.executable)], []),
        )
    )
    yield Setup(go_peers, mesh, procs)


def inbound_sidecar(setup: Setup, allow: list[dict[str, str]]) -> tuple[Sidecar, int]:
    echo = start_echo(setup.procs)
    target = {"app": f"127.0.0.1:{echo}", "allow": allow}
    config: dict[str, Any] = {
        "workload_api_socket": setup.mesh.endpoint,
        "inbound": {"targets": {8080: target}},
    }
    sidecar = start_sidecar(setup.procs, "sidecar", config, extra_args=["--log-level", "info"])
    return sidecar, echo


def go_client(setup: Setup, port: int, *authorize: str) -> subprocess.CompletedProcess[str]:
    argv = [str(setup.peers.spiffetls), "client", "-addr", setup.mesh.endpoint]
    argv += ["-connect", f"127.0.0.1:{port}", "-target", TARGET, *authorize]
    return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --- a Go spiffetls client -> a Trellis sidecar's inbound -> the app ------------------------


def test_a_go_spiffetls_client_reaches_an_app_through_a_trellis_sidecar(setup: Setup) -> None:
    sidecar, _ = inbound_sidecar(setup, allow=[{"exact": GO_ID}])
    result = go_client(setup, sidecar.inbound_port, "-id", SIDECAR_ID, "-message", "hi go")
    assert result.returncode == 0, result.stderr
    connected, tunnel = lines(result.stdout)
    # go-spiffe saw the sidecar's ID; the sidecar let GO_ID (and only it) through.
    assert connected["own_id"] == GO_ID
    assert connected["peer_id"] == SIDECAR_ID
    assert connected["alpn"] == "h2"
    assert connected["group"] == "X25519MLKEM768"
    assert tunnel == {"event": "tunnel", "status": 200, "echo": "hi go"}
    assert sidecar.metric('trellis_sidecar_policy_decisions_total{decision="allow"}') == 1


def test_a_go_spiffetls_client_refuses_a_sidecar_with_the_wrong_spiffe_id(
    setup: Setup,
) -> None:
    sidecar, _ = inbound_sidecar(setup, allow=[{"exact": GO_ID}])
    result = go_client(setup, sidecar.inbound_port, "-id", OTHER_ID)
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("spiffetls: dial: "), line
    assert f'unexpected ID "{SIDECAR_ID}"' in line, line
    assert sidecar.metric('trellis_sidecar_policy_decisions_total{decision="allow"}') == 0


def test_a_trellis_sidecar_refuses_a_go_spiffetls_client_it_does_not_allow(
    setup: Setup,
) -> None:
    sidecar, _ = inbound_sidecar(setup, allow=[{"exact": OTHER_ID}])
    result = go_client(setup, sidecar.inbound_port, "-member-of", "example.org")
    assert result.returncode == 1
    assert lines(result.stdout)[0]["peer_id"] == SIDECAR_ID  # TLS itself succeeded
    assert result.stderr.splitlines() == ["spiffetls: CONNECT: refused with HTTP 403"]
    assert sidecar.metric('trellis_sidecar_policy_decisions_total{decision="deny"}') == 1
    assert f"denied {GO_ID} -> port 8080" in sidecar.proc.output()


# --- an app -> a Trellis sidecar's outbound -> a Go spiffetls server -------------------------


def go_server(setup: Setup, *authorize: str) -> tuple[Proc, int]:
    argv = [str(setup.peers.spiffetls), "server", "-addr", setup.mesh.endpoint, *authorize]
    proc = setup.procs.start("go-server", argv)
    found: list[int] = []

    def listening() -> bool:
        if not proc.alive():
            raise AssertionError(f"the Go server exited: {proc.output()}")
        for event in lines(proc.output()):
            if event["event"] == "listening":
                assert event["own_id"] == GO_ID
                found.append(int(event["addr"].rsplit(":", 1)[1]))
                return True
        return False

    wait_for(listening, 30, "the Go spiffetls server")
    return proc, found[0]


def outbound_sidecar(setup: Setup, go_port: int, expect: str) -> tuple[Sidecar, int]:
    upstream = free_port()
    config: dict[str, Any] = {
        "workload_api_socket": setup.mesh.endpoint,
        "upstreams": [
            {
                "name": "go",
                "listen": f"127.0.0.1:{upstream}",
                "target": TARGET,
                "endpoints": [f"127.0.0.1:{go_port}"],
                "spiffe_ids": [expect],
            }
        ],
    }
    sidecar = start_sidecar(setup.procs, "sidecar", config, extra_args=["--log-level", "info"])
    return sidecar, upstream


def refused_roundtrip(port: int) -> bytes:
    """What the app gets back when the sidecar cannot reach its peer: nothing (a close
    or a reset, depending on how far the bytes got)."""
    try:
        return roundtrip(port, b"hello\n")
    except ConnectionResetError:
        return b""


def server_events(proc: Proc, name: str) -> list[dict[str, Any]]:
    return [e for e in lines(proc.output()) if e["event"] == name]


def test_a_trellis_sidecars_outbound_reaches_a_go_spiffetls_server(setup: Setup) -> None:
    proc, port = go_server(setup, "-id", SIDECAR_ID)
    sidecar, upstream = outbound_sidecar(setup, port, expect=GO_ID)
    assert roundtrip(upstream, b"hello go server\n") == b"hello go server\n"
    (accepted,) = server_events(proc, "accepted")
    assert accepted["peer_id"] == SIDECAR_ID  # go-spiffe saw the sidecar's ID
    assert accepted["alpn"] == "h2"
    assert server_events(proc, "tunnel") == [
        {"event": "tunnel", "authority": TARGET, "peer_id": SIDECAR_ID}
    ]
    # The sidecar accepted the Go server as GO_ID (its upstream's only allowed ID).
    assert sidecar.metric('trellis_sidecar_tls_handshakes_total{direction="outbound"}') == 1


def test_a_go_spiffetls_server_refuses_a_sidecar_with_the_wrong_spiffe_id(
    setup: Setup,
) -> None:
    proc, port = go_server(setup, "-id", OTHER_ID)
    sidecar, upstream = outbound_sidecar(setup, port, expect=GO_ID)
    assert refused_roundtrip(upstream) == b""
    # The sidecar holds an ECH config for the Go server's ID (it has a registration
    # entry), which the Go server, without ECH keys, rejects without retry configs: the
    # sidecar ends that handshake with ech_required and dials again without ECH (RFC 9849
    # §6.1.6), and that handshake reaches the Go server's ID check.
    unexpected = f'unexpected ID "{SIDECAR_ID}"'

    def judged() -> bool:
        return any(unexpected in r["reason"] for r in server_events(proc, "refused"))

    wait_for(judged, 15, "the Go server's refusal of the sidecar's ID")
    assert server_events(proc, "tunnel") == []
    # TLS 1.3: the client's handshake completes before the server judges its certificate
    # (RFC 8446 §4.4.2), so the sidecar learns of the refusal as the stream fails.
    assert sidecar.metric('trellis_sidecar_streams_total{direction="outbound",outcome="ok"}') == 0


def test_a_trellis_sidecar_refuses_a_go_spiffetls_server_with_the_wrong_spiffe_id(
    setup: Setup,
) -> None:
    proc, port = go_server(setup, "-member-of", "example.org")
    sidecar, upstream = outbound_sidecar(setup, port, expect=OTHER_ID)
    assert refused_roundtrip(upstream) == b""
    wait_for(lambda: bool(server_events(proc, "refused")), 15, "the Go server's view")
    # The sidecar aborts the handshake with access_denied on reading the Go server's
    # certificate. Go reports "bad record MAC", not the alert: the engine sends that alert
    # in plaintext (RFC 8446 Appendix A.1: a client's K_send becomes the handshake key
    # only after the server's Finished), while Go's server already reads the client's
    # records with the handshake key. So the reason is asserted from the sidecar's side.
    assert "unable to complete TLS handshake" in server_events(proc, "refused")[0]["reason"]
    assert server_events(proc, "accepted") == []
    assert f"failed: access_denied: policy refused {GO_ID}" in sidecar.proc.output()
