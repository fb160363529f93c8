"""Pooled connections end with the SVIDs that authenticated them (two real sidecar
processes on loopback, SVIDs from a real intermediate with a TTL of seconds, never
renewed: `--svid-dir` is read once).

Before: more than a minute past the peer's notAfter, new app connections still rode the
old pooled TLS connection while a fresh handshake was refused with certificate_expired.
"""

from __future__ import annotations

import datetime as dt
import socket
import time
from pathlib import Path

from cryptography import x509

from tests.support import free_port

from .conftest import CLIENT, ECHO
from .harness import Pki, Procs, RawClient, roundtrip, start_echo, start_sidecar

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
