"""The data path modes on a kernel without kTLS: two real sidecar processes on loopback.

The host kernel has no TLS ULP (`tcp_available_ulp` lists only mptcp), so every
connection here takes the fallback: the engine's user-space record layer, counted in
`trellis_ktls_fallback_total{reason="no_kernel_support"}` and shown as ``user-space``
in /config. The kernel paths (``ktls``, ``ktls+splice``) are proven in the guest
(tests/kernel/guest/test_ktls_sidecar.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ConfigError, parse_config
from sidecar.ktls import probe
from tests.sidecar.dataplane.harness import (
    Pair,
    Pki,
    Procs,
    Sidecar,
    roundtrip,
    start_echo,
    start_pair,
    start_sidecar,
)
from tests.support import free_port, wait_for

CLIENT = "spiffe://example.org/ns/default/sa/client"
ECHO = "spiffe://example.org/ns/default/sa/echo"
INTRUDER = "spiffe://example.org/ns/default/sa/intruder"
FALLBACK = 'trellis_ktls_fallback_total{reason="no_kernel_support"}'

pytestmark = pytest.mark.skipif(
    probe().available, reason="this kernel has kTLS: the fallback cannot be shown here"
)


@pytest.fixture
def procs() -> Iterator[Procs]:
    workdir = Path(tempfile.mkdtemp(prefix="tr-ktls-"))
    registry = Procs(workdir)
    try:
        yield registry
    finally:
        running = list(registry.running)
        registry.stop_all()
        for proc in running:  # shown by pytest only when the test failed
            print(f"--- {proc.name} (exit {proc.popen.returncode}) ---\n{proc.output()[-4000:]}")
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki("example.org")


def start_direct_pair(procs: Procs, pki: Pki, client_id: str = CLIENT) -> Pair:
    """client app -> sidecar A (an upstream in mode: direct) -> sidecar B -> echo app."""
    echo = start_echo(procs)
    b_dir = pki.write(procs.workdir / "svid-b", ECHO)
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "svid_dir": str(b_dir),
            "inbound": {
                "targets": {8080: {"app": f"127.0.0.1:{echo}", "allow": [{"exact": CLIENT}]}}
            },
        },
        extra_args=["--log-level", "info"],
    )
    a_dir = pki.write(procs.workdir / "svid-a", client_id)
    upstream = free_port()
    a = start_sidecar(
        procs,
        "sidecar-a",
        {
            "svid_dir": str(a_dir),
            "upstreams": [
                {
                    "name": "echo",
                    "listen": f"127.0.0.1:{upstream}",
                    "target": "echo.default:8080",
                    "endpoints": [f"127.0.0.1:{b.inbound_port}"],
                    "spiffe_ids": [ECHO],
                    "mode": "direct",
                }
            ],
        },
        extra_args=["--log-level", "info"],
    )
    return Pair(a, b, upstream, echo)


def _open_connection(port: int) -> socket.socket:
    """An app connection that has carried one echo round trip and stays open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"hello")
    got = b""
    deadline = time.monotonic() + 10
    while len(got) < 5 and time.monotonic() < deadline:
        chunk = sock.recv(16)
        if not chunk:
            break
        got += chunk
    assert got == b"hello"
    return sock


def _handshakes(sidecar: Sidecar, direction: str) -> float:
    return sidecar.metric(f'trellis_sidecar_tls_handshakes_total{{direction="{direction}"}}')


def test_pooled_traffic_falls_back_to_the_user_space_record_layer_and_counts_it(
    procs: Procs, pki: Pki
) -> None:
    pair = start_pair(procs, pki, client_id=CLIENT, server_id=ECHO, allow=[{"exact": CLIENT}])
    payload = os.urandom(1 << 20)
    back = roundtrip(pair.upstream_port, payload)
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    for sidecar in (pair.a, pair.b):
        metrics = sidecar.metrics()
        assert metrics['trellis_ktls_enabled{direction="outbound"}'] == 0
        assert metrics['trellis_ktls_enabled{direction="inbound"}'] == 0
        # One pooled connection, wanted in the kernel by each side, kept in user space.
        assert metrics[FALLBACK] == 1
    sock = _open_connection(pair.upstream_port)
    try:
        (pool,) = pair.a.describe()["pools"]
        assert [c["data_path"] for c in pool["connections"]] == ["user-space"]
        inbound = pair.b.describe()["inbound_connections"]
        assert [c["data_path"] for c in inbound] == ["user-space"]
    finally:
        sock.close()
    assert "kTLS off, using the user-space record layer" in pair.a.proc.output()


def test_direct_mode_without_ktls_relays_in_user_space_one_tls_connection_per_app_connection(
    procs: Procs, pki: Pki
) -> None:
    pair = start_direct_pair(procs, pki)
    payloads = [os.urandom(size) for size in (1, 1 << 16, 4 << 20)]
    for payload in payloads:
        back = roundtrip(pair.upstream_port, payload)
        assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    # Two app connections open at once: two more TLS connections, not two streams on one.
    first, second = _open_connection(pair.upstream_port), _open_connection(pair.upstream_port)
    try:
        a_config, b_config = pair.a.describe(), pair.b.describe()
        assert [link["data_path"] for link in a_config["direct"]["outbound"]] == ["user-space"] * 2
        assert [link["data_path"] for link in b_config["direct"]["inbound"]] == ["user-space"] * 2
        assert {link["peer"] for link in b_config["direct"]["inbound"]} == {CLIENT}
        assert a_config["pools"] == []  # nothing went through a pool
    finally:
        first.close()
        second.close()
    assert _handshakes(pair.a, "outbound") == 5
    assert _handshakes(pair.b, "inbound") == 5
    a, b = pair.a.metrics(), pair.b.metrics()
    assert a[FALLBACK] == 5
    assert b[FALLBACK] == 5
    assert b['trellis_sidecar_policy_decisions_total{decision="allow"}'] == 5
    wait_for(lambda: not pair.b.describe()["direct"]["inbound"], 10, "direct links closed")
    wait_for(lambda: not pair.a.describe()["direct"]["outbound"], 10, "direct links closed")
    # One access-log line per direct connection on each side, as for a stream.
    assert pair.a.proc.output().count(f"ok -> echo.default:8080 ({ECHO})") == 5
    assert pair.b.proc.output().count(f"ok {CLIENT} -> port 8080") == 5


def test_direct_mode_refuses_an_identity_the_policy_does_not_allow(procs: Procs, pki: Pki) -> None:
    pair = start_direct_pair(procs, pki, client_id=INTRUDER)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        back = roundtrip(pair.upstream_port, b"let me in", timeout=10)
        if not back:
            raise ConnectionResetError("closed without data")
    b = pair.b.metrics()
    assert b['trellis_sidecar_policy_decisions_total{decision="deny"}'] == 1
    assert b['trellis_sidecar_app_connections_total{direction="inbound"}'] == 0


@pytest.mark.parametrize(
    ("key", "value"), [("mode", "spliced"), ("ktls", "on")], ids=["mode", "ktls"]
)
def test_an_unknown_mode_or_ktls_setting_is_refused_naming_the_field(key: str, value: str) -> None:
    upstream: dict[str, Any] = {
        "listen": "127.0.0.1:9001",
        "target": "echo.default:8080",
        "endpoints": ["127.0.0.1:15008"],
        key: value,
    }
    with pytest.raises(ConfigError) as caught:
        parse_config({"upstreams": [upstream]})
    assert f"upstreams[0].{key}" in str(caught.value)
    assert "expected one of" in str(caught.value)


def test_upstreams_are_pooled_with_ktls_auto_by_default() -> None:
    config = parse_config(
        {
            "upstreams": [
                {
                    "listen": "127.0.0.1:9001",
                    "target": "echo.default:8080",
                    "endpoints": ["127.0.0.1:15008"],
                }
            ]
        }
    )
    (upstream,) = config.upstreams
    assert (upstream.mode, upstream.ktls) == ("pooled", "auto")
