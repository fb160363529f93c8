"""Failure paths over real processes: malformed requests, killed peers, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from typing import Any

import pytest

from .conftest import CLIENT, ECHO
from .harness import (
    Pki,
    Procs,
    RawClient,
    free_port,
    roundtrip,
    start_echo,
    start_pair,
    start_sidecar,
    wait_for,
)


def _echo_server(procs: Procs, pki: Pki) -> tuple[Any, int]:
    echo = start_echo(procs)
    svid = pki.write(procs.workdir / "svid-b", ECHO)
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "svid_dir": str(svid),
            "inbound": {
                "targets": {8080: {"app": f"127.0.0.1:{echo}", "allow": [{"exact": CLIENT}]}},
            },
        },
    )
    return b, echo


def test_bad_connect_requests_get_400_class_answers_and_nothing_else_is_affected(
    procs: Procs, pki: Pki
) -> None:
    b, _ = _echo_server(procs, pki)
    client_dir = pki.write(procs.workdir / "svid-raw", CLIENT)
    raw = RawClient(b.inbound_port, client_dir)
    try:
        assert raw.request([(":method", "CONNECT"), (":authority", "echo:9999")]) == 404
        get = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x:1")]
        assert raw.request(get) == 405
        assert raw.request([(":method", "CONNECT"), (":authority", "no-port")]) == 400
        # The same connection still carries a good stream.
        assert raw.request([(":method", "CONNECT"), (":authority", "echo:8080")]) == 200
    finally:
        raw.close()
    # A connection that sends HTTP/2 garbage is closed; a sibling connection is not.
    good = RawClient(b.inbound_port, client_dir)
    bad = RawClient(b.inbound_port, client_dir)
    try:
        bad.send_plaintext(b"\x00\x00\x04\x09\x00\x00\x00\x00\x07garbage!!")
        with pytest.raises((ConnectionResetError, OSError)):
            for _ in range(20):
                bad.receive_events()
        assert good.request([(":method", "CONNECT"), (":authority", "echo:8080")]) == 200
    finally:
        good.close()
        bad.close()
    metrics = b.metrics()
    assert metrics['trellis_sidecar_connect_requests_rejected_total{status="404"}'] == 1
    assert metrics['trellis_sidecar_connect_requests_rejected_total{status="405"}'] == 1
    assert metrics['trellis_sidecar_connect_requests_rejected_total{status="400"}'] == 1
    assert b.proc.alive()


def test_rapid_reset_gets_goaway_and_spares_other_connections(procs: Procs, pki: Pki) -> None:
    """CVE-2023-44487: open a stream, reset it, repeat. Every CONNECT makes the sidecar
    dial its app, so past a budget the connection is closed with ENHANCE_YOUR_CALM."""
    import h2.errors
    import h2.events

    b, _ = _echo_server(procs, pki)
    client_dir = pki.write(procs.workdir / "svid-raw", CLIENT)
    good = RawClient(b.inbound_port, client_dir)
    attacker = RawClient(b.inbound_port, client_dir)
    goaway: list[Any] = []
    try:
        with pytest.raises((ConnectionResetError, OSError)):
            for _ in range(1000):
                stream_id = attacker.h2.get_next_available_stream_id()
                attacker.h2.send_headers(
                    stream_id, [(":method", "CONNECT"), (":authority", "echo:8080")]
                )
                attacker.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                attacker.flush()
            while True:  # the sidecar closes the connection: reading ends in a reset/EOF
                goaway += [
                    e
                    for e in attacker.receive_events()
                    if isinstance(e, h2.events.ConnectionTerminated)
                ]
        # The GOAWAY may be lost to the TCP reset that closing with unread input causes.
        assert all(e.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM for e in goaway)
        assert good.request([(":method", "CONNECT"), (":authority", "echo:8080")]) == 200
    finally:
        good.close()
        attacker.close()
    assert b.metrics()['trellis_sidecar_connections_closed_by_us_total{reason="abuse"}'] == 1
    assert b.proc.alive()


def test_plaintext_on_the_mtls_port_fails_the_handshake_only(procs: Procs, pki: Pki) -> None:
    b, _ = _echo_server(procs, pki)
    with socket.create_connection(("127.0.0.1", b.inbound_port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.recv(100)
        assert reply[:1] in (b"\x15", b"")  # a TLS alert record, then close
    wait_for(
        lambda: any(
            k.startswith("trellis_sidecar_tls_handshake_failures_total") and v >= 1
            for k, v in b.metrics().items()
        ),
        5,
        "the failure metric",
    )
    assert b.get("/readyz")[0] == 200


class _Trickle(threading.Thread):
    """Sends a chunk every 20 ms for `seconds`, reading the echo; records the outcome."""

    def __init__(self, port: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.seconds = port, seconds
        self.outcome = "running"
        self.echoed = 0

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                end = time.monotonic() + self.seconds
                while time.monotonic() < end:
                    sock.sendall(b"x" * 1024)
                    got = 0
                    while got < 1024:
                        chunk = sock.recv(1024 - got)
                        if not chunk:
                            raise ConnectionResetError("EOF mid-stream")
                        got += len(chunk)
                    self.echoed += got
                    time.sleep(0.02)
                sock.shutdown(socket.SHUT_WR)
                if sock.recv(10) != b"":
                    raise AssertionError("unexpected bytes after EOF")
            self.outcome = "ok"
        except (OSError, AssertionError) as exc:
            self.outcome = f"failed: {exc}"


def test_killing_a_peer_sidecar_fails_only_its_streams_and_the_pool_recovers(
    procs: Procs, pki: Pki
) -> None:
    echo = start_echo(procs)
    servers = {}
    for name in ("b", "c"):
        svid = pki.write(procs.workdir / f"svid-{name}", ECHO)
        config = {
            "svid_dir": str(svid),
            "inbound": {
                "listen": f"127.0.0.1:{free_port()}",
                "targets": {8080: {"app": f"127.0.0.1:{echo}"}},
            },
        }
        servers[name] = (start_sidecar(procs, f"sidecar-{name}", config), config)
    ports = {name: free_port() for name in servers}
    a = start_sidecar(
        procs,
        "sidecar-a",
        {
            "svid_dir": str(pki.write(procs.workdir / "svid-a", CLIENT)),
            "upstreams": [
                {
                    "name": name,
                    "listen": f"127.0.0.1:{ports[name]}",
                    "target": "echo:8080",
                    "endpoints": [f"127.0.0.1:{servers[name][0].inbound_port}"],
                    "spiffe_ids": [ECHO],
                }
                for name in servers
            ],
        },
    )
    doomed = [_Trickle(ports["b"], 3.0) for _ in range(3)]
    survivors = [_Trickle(ports["c"], 3.0) for _ in range(3)]
    for t in doomed + survivors:
        t.start()
    wait_for(lambda: all(t.echoed > 0 for t in doomed + survivors), 10, "traffic on all streams")
    b, b_config = servers["b"]
    procs.stop(b.proc, signal.SIGKILL)
    for t in doomed + survivors:
        t.join(15)
    assert all(t.outcome.startswith("failed") for t in doomed), [t.outcome for t in doomed]
    assert all(t.outcome == "ok" for t in survivors), [t.outcome for t in survivors]
    # The pool notices and dials afresh once the peer is back on the same address.
    start_sidecar(procs, "sidecar-b2", b_config)
    assert roundtrip(ports["b"], b"back again") == b"back again"
    pools = {p["endpoint"]: p for p in a.describe()["pools"]}
    assert len(pools[f"127.0.0.1:{b.inbound_port}"]["connections"]) == 1


def test_sigterm_drains_open_streams_before_exiting(procs: Procs, pki: Pki) -> None:
    pair = start_pair(procs, pki, client_id=CLIENT, server_id=ECHO, allow=[{"exact": CLIENT}])
    streams = [_Trickle(pair.upstream_port, 1.5) for _ in range(3)]
    for t in streams:
        t.start()
    wait_for(lambda: all(t.echoed > 0 for t in streams), 10, "traffic")
    started = time.monotonic()
    pair.b.proc.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: pair.b.get("/readyz")[0] == 503, 5, "not ready while draining")
    for t in streams:
        t.join(15)
    assert [t.outcome for t in streams] == ["ok"] * 3
    assert pair.b.proc.popen.wait(15) == 0
    assert time.monotonic() - started < 10
    # A new app connection after the drain finds no peer: reset, not a hang.
    with pytest.raises((ConnectionResetError, BrokenPipeError, AssertionError)):
        assert roundtrip(pair.upstream_port, b"late", timeout=10) == b"late"


def test_a_slow_reader_never_makes_the_sidecars_buffer_without_bound(
    procs: Procs, pki: Pki
) -> None:
    pair = start_pair(procs, pki, client_id=CLIENT, server_id=ECHO, allow=[{"exact": CLIENT}])

    def rss_kib(pid: int) -> int:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    before = {s.proc.name: rss_kib(s.proc.popen.pid) for s in (pair.a, pair.b)}
    sent = 0
    chunk = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", pair.upstream_port), timeout=10) as sock:
        sock.settimeout(2)
        # Never read: the echo's replies back up to us, then everything stalls.
        try:
            while sent < 256 << 20:
                sent += sock.send(chunk)
        except TimeoutError:
            pass
        after = {s.proc.name: rss_kib(s.proc.popen.pid) for s in (pair.a, pair.b)}
    assert sent < 128 << 20, "the sidecars accepted everything: no backpressure"
    for name, rss in after.items():
        assert rss - before[name] < 48 * 1024, (name, before[name], rss)


class _RecordingApp(threading.Thread):
    """Accepts connections and records how each one ended: 'fin' or 'rst'."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.endings: list[str] = []

    def run(self) -> None:
        self.server.settimeout(15)
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while conn.recv(65536):
                    pass
                self.endings.append("fin")
            except ConnectionResetError:
                self.endings.append("rst")
            except OSError as exc:
                self.endings.append(f"error {exc!r}")


def test_an_app_reset_arrives_as_a_reset_and_a_fin_as_a_fin(procs: Procs, pki: Pki) -> None:
    app = _RecordingApp()
    app.start()
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "svid_dir": str(pki.write(procs.workdir / "svid-b", ECHO)),
            "inbound": {"targets": {8080: {"app": f"127.0.0.1:{app.port}"}}},
        },
    )
    upstream = free_port()
    start_sidecar(
        procs,
        "sidecar-a",
        {
            "svid_dir": str(pki.write(procs.workdir / "svid-a", CLIENT)),
            "upstreams": [
                {
                    "name": "app",
                    "listen": f"127.0.0.1:{upstream}",
                    "target": "app:8080",
                    "endpoints": [f"127.0.0.1:{b.inbound_port}"],
                    "spiffe_ids": [ECHO],
                }
            ],
        },
    )
    with socket.create_connection(("127.0.0.1", upstream), timeout=10) as graceful:
        graceful.sendall(b"bye")
        graceful.shutdown(socket.SHUT_WR)
        wait_for(lambda: len(app.endings) == 1, 10, "the FIN at the app")
    abrupt = socket.create_connection(("127.0.0.1", upstream), timeout=10)
    abrupt.sendall(b"oops")
    time.sleep(0.3)  # the stream exists and the app connection is up
    abrupt.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    abrupt.close()  # RST
    wait_for(lambda: len(app.endings) == 2, 10, "the RST at the app")
    app.server.close()
    assert app.endings == ["fin", "rst"]
