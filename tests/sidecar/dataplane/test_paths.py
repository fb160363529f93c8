"""Bytes through two real sidecar processes, refusals, and pooling, all on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import CLIENT, ECHO, INTRUDER
from .harness import Pki, Procs, roundtrip, start_pair, wait_for


@pytest.mark.parametrize("size", [1024, 1 << 20, 100 << 20], ids=["1KiB", "1MiB", "100MiB"])
def test_bytes_arrive_intact_through_both_sidecars(procs: Procs, pki: Pki, size: int) -> None:
    pair = start_pair(procs, pki, client_id=CLIENT, server_id=ECHO, allow=[{"exact": CLIENT}])
    payload = os.urandom(size)
    back = roundtrip(pair.upstream_port, payload, timeout=120)
    assert len(back) == size
    assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    metrics = pair.b.metrics()
    assert metrics['trellis_sidecar_policy_decisions_total{decision="allow"}'] == 1
    assert metrics['trellis_sidecar_bytes_total{direction="in"}'] == size


def test_many_concurrent_streams_each_get_their_own_bytes_back(procs: Procs, pki: Pki) -> None:
    pair = start_pair(procs, pki, client_id=CLIENT, server_id=ECHO, allow=[{"exact": CLIENT}])
    payloads = [os.urandom(1024 * (1 + i % 7) * (1 + (i % 3) * 50)) for i in range(120)]
    with ThreadPoolExecutor(max_workers=60) as pool:
        results = list(pool.map(lambda p: roundtrip(pair.upstream_port, p), payloads))
    assert results == payloads
    metrics = pair.a.metrics()
    # 120 app connections, at most 60 at once: two connections at most (100 streams each).
    assert metrics['trellis_sidecar_tls_handshakes_total{direction="outbound"}'] <= 2
    assert metrics['trellis_sidecar_streams_total{direction="outbound",outcome="ok"}'] == 120


def test_a_caller_with_the_wrong_identity_is_refused_with_403_and_counted(
    procs: Procs, pki: Pki
) -> None:
    pair = start_pair(procs, pki, client_id=INTRUDER, server_id=ECHO, allow=[{"exact": CLIENT}])
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        back = roundtrip(pair.upstream_port, b"let me in", timeout=10)
        if not back:
            raise ConnectionResetError("closed without data")
    b = pair.b.metrics()
    assert b['trellis_sidecar_policy_decisions_total{decision="deny"}'] == 1
    assert b['trellis_sidecar_policy_decisions_total{decision="allow"}'] == 0
    assert b['trellis_sidecar_app_connections_total{direction="inbound"}'] == 0
    a = pair.a.metrics()
    assert a['trellis_sidecar_streams_total{direction="outbound",outcome="refused"}'] == 1


def test_a_prefix_rule_admits_a_whole_namespace(procs: Procs, pki: Pki) -> None:
    pair = start_pair(
        procs,
        pki,
        client_id=CLIENT,
        server_id=ECHO,
        allow=[{"prefix": "spiffe://example.org/ns/default"}],
    )
    assert roundtrip(pair.upstream_port, b"ping") == b"ping"


def test_a_peer_from_another_trust_domain_is_refused_at_the_handshake(
    procs: Procs, pki: Pki, foreign_pki: Pki
) -> None:
    # The foreign client trusts our root (so it would accept B) but B does not trust its.
    pair = start_pair(
        procs,
        pki,
        client_id="spiffe://other.example/ns/default/sa/client",
        server_id=ECHO,
        allow=[{"prefix": "spiffe://other.example"}],
        client_pki=foreign_pki,
        client_extra_roots=[pki.root.certificate],
    )
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        back = roundtrip(pair.upstream_port, b"hello", timeout=10)
        if not back:
            raise ConnectionResetError("closed without data")
    b = pair.b.metrics()
    failures = {
        k: v for k, v in b.items() if k.startswith("trellis_sidecar_tls_handshake_failures_total")
    }
    assert sum(failures.values()) >= 1, failures
    assert b['trellis_sidecar_tls_handshakes_total{direction="inbound"}'] == 0
    assert b['trellis_sidecar_policy_decisions_total{decision="allow"}'] == 0


async def _hammer(port: int, count: int, concurrency: int) -> list[str]:
    """`count` app connections, `concurrency` at a time; returns what went wrong."""
    semaphore = asyncio.Semaphore(concurrency)
    problems: list[str] = []

    async def one(index: int) -> None:
        async with semaphore:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                message = f"request {index}".encode()
                writer.write(message)
                writer.write_eof()
                data = await asyncio.wait_for(reader.read(), 30)
                writer.close()
                if data != message:
                    problems.append(f"{index}: got {data!r}")
            except (OSError, TimeoutError) as exc:
                problems.append(f"{index}: {exc!r}")

    await asyncio.gather(*(one(i) for i in range(count)))
    return problems


def test_a_thousand_app_connections_cost_at_most_four_handshakes(procs: Procs, pki: Pki) -> None:
    pair = start_pair(procs, pki, client_id=CLIENT, server_id=ECHO, allow=[{"exact": CLIENT}])
    problems = asyncio.run(asyncio.wait_for(_hammer(pair.upstream_port, 1000, 200), 90))
    assert problems == []
    a = pair.a.metrics()
    handshakes = a['trellis_sidecar_tls_handshakes_total{direction="outbound"}']
    assert a['trellis_sidecar_app_connections_total{direction="outbound"}'] == 1000
    assert 1 <= handshakes <= 4
    assert (
        pair.b.metrics()['trellis_sidecar_tls_handshakes_total{direction="inbound"}'] == handshakes
    )


def test_half_close_reaches_the_app_and_the_reply_still_comes_back(procs: Procs, pki: Pki) -> None:
    pair = start_pair(procs, pki, client_id=CLIENT, server_id=ECHO, allow=[{"exact": CLIENT}])
    with socket.create_connection(("127.0.0.1", pair.upstream_port), timeout=10) as sock:
        sock.sendall(b"first")
        assert sock.recv(100) == b"first"
        sock.shutdown(socket.SHUT_WR)  # FIN → END_STREAM → FIN to the echo app → its FIN back
        assert sock.recv(100) == b""


def test_the_sidecar_is_ready_only_with_an_svid_and_reports_it(procs: Procs, pki: Pki) -> None:
    pair = start_pair(procs, pki, client_id=CLIENT, server_id=ECHO, allow=[{"exact": CLIENT}])
    status, _ = pair.a.get("/readyz")
    assert status == 200
    assert pair.a.get("/healthz")[0] == 200
    config = pair.a.describe()
    assert config["identity"]["spiffe_id"] == CLIENT
    assert config["identity"]["serial"]
    assert config["upstreams"][0]["spiffe_ids"] == [ECHO]
    roundtrip(pair.upstream_port, b"x")
    wait_for(lambda: bool(pair.a.describe()["pools"]), 5, "a pool")
    pools = pair.a.describe()["pools"]
    assert pools[0]["spiffe_ids"] == [ECHO] and len(pools[0]["connections"]) == 1
