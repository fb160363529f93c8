"""Pooled connections end with the SVIDs that authenticated them: two real sidecar
processes on loopback, with SVIDs from a real intermediate with a TTL of seconds, never
renewed (`--svid-dir` is read once), or from the real CA and agent, whose entry is then
deleted.

Before: more than a minute past the peer's notAfter, new app connections still rode the
old pooled TLS connection while a fresh handshake was refused with certificate_expired.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from pathlib import Path

import yaml
from cryptography import x509

from tests.support import free_port, wait_for

from .conftest import CLIENT, ECHO
from .harness import Pki, Procs, RawClient, roundtrip, start_echo, start_sidecar
from .test_rotation import _agent_argv, _start_ca

TTL = dt.timedelta(seconds=20)
CLOSED = "trellis_sidecar_connections_closed_by_us_total"


def _not_after(svid_dir: Path) -> float:
    leaf = x509.load_pem_x509_certificates((svid_dir / "svid.pem").read_bytes())[0]
    return leaf.not_valid_after_utc.timestamp()


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_a_pooled_connection_takes_no_new_streams_past_the_peer_svid_not_after(
    procs: Procs, pki: Pki
) -> None:
    echo = start_echo(procs)
    b_dir = pki.write(procs.workdir / "svid-b", ECHO, ttl=TTL)
    expiry = _not_after(b_dir)
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "svid_dir": str(b_dir),
            "drain_timeout": "30s",
            "inbound": {"targets": {8080: {"app": f"127.0.0.1:{echo}"}}},
        },
        extra_args=["--log-level", "info"],
    )
    a_dir = pki.write(procs.workdir / "svid-a", CLIENT)
    upstream = free_port()
    a = start_sidecar(
        procs,
        "sidecar-a",
        {
            "svid_dir": str(a_dir),
            "drain_timeout": "30s",
            "upstreams": [
                {
                    "name": "echo",
                    "listen": f"127.0.0.1:{upstream}",
                    "target": "echo.default:8080",
                    "endpoints": [f"127.0.0.1:{b.inbound_port}"],
                    "spiffe_ids": [ECHO],
                }
            ],
        },
        extra_args=["--log-level", "info"],
    )
    # A stream that stays open across the notAfter, and a caller holding its own
    # connection to B with an open stream.
    in_flight = socket.create_connection(("127.0.0.1", upstream), timeout=10)
    raw = RawClient(b.inbound_port, a_dir)
    try:
        in_flight.sendall(b"one")
        assert _read_exactly(in_flight, 3) == b"one"
        assert roundtrip(upstream, b"pooled") == b"pooled"
        assert raw.request([(":method", "CONNECT"), (":authority", "echo.default:8080")]) == 200
        handshakes = 'trellis_sidecar_tls_handshakes_total{direction="outbound"}'
        assert a.metric(handshakes) == 1
        assert time.time() < expiry, "the sidecars took longer to start than the SVID lives"

        time.sleep(max(0.0, expiry - time.time()) + 1.5)

        # The inbound side: GOAWAY, naming why, on a connection it did not dial.
        import h2.events

        goaway = None
        deadline = time.monotonic() + 10
        while goaway is None and time.monotonic() < deadline:
            try:
                events = raw.receive_events()
            except TimeoutError:
                break
            for event in events:
                if isinstance(event, h2.events.ConnectionTerminated):
                    goaway = event
        assert goaway is not None and goaway.additional_data == b"local_certificate_expired"

        # A new app connection is not carried on the old connection: a fresh dial is
        # needed, and B's expired SVID fails it.
        try:
            answer = roundtrip(upstream, b"late", timeout=15)
        except ConnectionError:
            answer = b""
        assert answer == b""
        assert a.metric(handshakes) == 1
        failed = (
            "trellis_sidecar_tls_handshake_failures_total"
            '{direction="outbound",reason="certificate_expired"}'
        )
        assert a.metric(failed) >= 1

        # The stream in flight at the notAfter still finishes.
        in_flight.sendall(b"two")
        assert _read_exactly(in_flight, 3) == b"two"
        in_flight.shutdown(socket.SHUT_WR)
        assert _read_exactly(in_flight, 1) == b""

        assert a.metric(f'{CLOSED}{{reason="peer_certificate_expired"}}') == 1
        # Both of B's connections (A's and the raw caller's), with B's own SVID expired.
        assert b.metric(f'{CLOSED}{{reason="local_certificate_expired"}}') == 2
    finally:
        in_flight.close()
        raw.close()


def test_deleting_the_entry_withdraws_the_svid_and_drains_its_pooled_connection(
    procs: Procs,
) -> None:
    """The real CA, agent and sidecars: the client's registration entry is removed, the
    agent stops offering its SVID, and the client sidecar drains what that SVID
    authenticated instead of carrying new streams on it until it expires."""
    ca_port, attest_port, token = _start_ca(procs)
    agent_socket = procs.workdir / "agent.sock"
    procs.start(
        "agent", [*_agent_argv(procs, ca_port, attest_port, agent_socket), "--join-token", token]
    )
    wait_for(agent_socket.is_socket, 40, "the agent's socket")
    endpoint = f"unix://{agent_socket}"
    echo = start_echo(procs)
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "workload_api_socket": endpoint,
            "spiffe_id": ECHO,
            "inbound": {"targets": {8080: {"app": f"127.0.0.1:{echo}"}}},
        },
    )
    upstream = free_port()
    a = start_sidecar(
        procs,
        "sidecar-a",
        {
            "workload_api_socket": endpoint,
            "spiffe_id": CLIENT,
            "upstreams": [
                {
                    "name": "echo",
                    "listen": f"127.0.0.1:{upstream}",
                    "target": "echo:8080",
                    "endpoints": [f"127.0.0.1:{b.inbound_port}"],
                    "spiffe_ids": [ECHO],
                }
            ],
        },
    )
    in_flight = socket.create_connection(("127.0.0.1", upstream), timeout=10)
    try:
        in_flight.sendall(b"one")
        assert _read_exactly(in_flight, 3) == b"one"

        entries_file = procs.workdir / "entries.yaml"
        entries = yaml.safe_load(entries_file.read_text())
        entries["entries"] = [e for e in entries["entries"] if e["spiffe_id"] != CLIENT]
        entries_file.write_text(yaml.safe_dump(entries))
        withdrawn = f'{CLOSED}{{reason="identity_withdrawn"}}'
        wait_for(lambda: a.metric(withdrawn) == 1, 30, "the client's connection to drain")
        assert a.get("/readyz")[0] == 503

        try:
            answer = roundtrip(upstream, b"late", timeout=15)
        except ConnectionError:
            answer = b""
        assert answer == b""
        in_flight.sendall(b"two")
        assert _read_exactly(in_flight, 3) == b"two"
        in_flight.shutdown(socket.SHUT_WR)
        assert _read_exactly(in_flight, 1) == b""
    finally:
        in_flight.close()
