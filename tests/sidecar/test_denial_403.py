"""A caller the peer's policy refuses learns why, where its protocol lets it.

Real processes on loopback: an HTTP server (the standard library's ``http.server``) behind
sidecar B, whose operator policy document (``--policy``, as the operator renders an
AccessPolicy) admits one SPIFFE ID on port 8080; sidecar A holds another identity and
forwards a local upstream port to B. A plain HTTP client (``http.client``) talks to A.

* ``protocol: http``: B answers the CONNECT ``:status 403`` naming the policy, and A turns
  that into an HTTP/1.1 ``403 Forbidden`` for the client, the policy's name in the body.
* ``protocol: tcp`` (or none): A resets the client's connection, as before; an HTTP answer
  would be garbage to a protocol that is not HTTP.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.sidecar.dataplane.conftest import pki, procs  # noqa: F401 (fixtures)
from tests.sidecar.dataplane.harness import Pki, Procs, start_sidecar
from tests.support import free_port, wait_for

CLIENT = "spiffe://example.org/ns/default/sa/client"
SERVER = "spiffe://example.org/ns/default/sa/web"
INTRUDER = "spiffe://example.org/ns/default/sa/intruder"
POLICY = "web-callers"


def _http_app(registry: Procs) -> int:
    port = free_port()
    registry.start("http-app", [sys.executable, "-m", "http.server", str(port), "-b", "127.0.0.1"])

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(up, 15, "the HTTP app")
    return port


def start_refusing_pair(registry: Procs, authority: Pki, protocol: str | None) -> int:
    """HTTP app ← sidecar B (policy admits only CLIENT on 8080) ← sidecar A (INTRUDER);
    returns A's upstream port."""
    workdir: Path = registry.workdir
    app = _http_app(registry)
    policy: dict[str, object] = {
        "name": POLICY,
        "selector": {"matchLabels": {"app": "web"}},
        "ports": [8080],
        "allow": [{"exact": CLIENT}],
    }
    if protocol is not None:
        policy["protocol"] = protocol
    (workdir / "policy.json").write_text(json.dumps({"policies": [policy]}))
    (workdir / "labels").write_text('app="web"\n')
    policy_args = ["--policy", str(workdir / "policy.json"), "--pod-labels"]
    b = start_sidecar(
        registry,
        "sidecar-b",
        {
            "svid_dir": str(authority.write(workdir / "svid-b", SERVER)),
            "inbound": {"targets": {8080: {"app": f"127.0.0.1:{app}"}}},
        },
        extra_args=[*policy_args, str(workdir / "labels")],
    )
    upstream = free_port()
    start_sidecar(
        registry,
        "sidecar-a",
        {
            "svid_dir": str(authority.write(workdir / "svid-a", INTRUDER)),
            "upstreams": [
                {
                    "name": "web",
                    "listen": f"127.0.0.1:{upstream}",
                    "target": "web.default:8080",
                    "endpoints": [f"127.0.0.1:{b.inbound_port}"],
                    "spiffe_ids": [SERVER],
                }
            ],
        },
    )
    return upstream


def test_a_refused_http_caller_gets_403_forbidden_naming_the_policy(
    procs: Procs,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    upstream = start_refusing_pair(procs, pki, "http")
    connection = http.client.HTTPConnection("127.0.0.1", upstream, timeout=10)
    try:
        connection.request("GET", "/", headers={"Host": "web.default"})
        response = connection.getresponse()
        body = response.read().decode()
    finally:
        connection.close()
    assert response.status == 403
    assert response.reason == "Forbidden"
    assert f"AccessPolicy {POLICY}" in body
    assert response.getheader("Trellis-Policy-Rule") == f"AccessPolicy {POLICY}"
    assert response.getheader("Connection") == "close"


def test_a_refused_http_caller_that_sends_a_body_still_reads_the_403(
    procs: Procs,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    """A client still sending its request body when the 403 comes reads the whole answer
    and then a clean end of stream. (The sidecar reads and drops the rest for a while before
    it closes, RFC 9112 §9.6; on Linux loopback a plain close happens to pass this too.)"""
    upstream = start_refusing_pair(procs, pki, "http")
    with socket.create_connection(("127.0.0.1", upstream), timeout=10) as sock:
        chunk = b"x" * (256 << 10)
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: web.default\r\n"
            + f"Content-Length: {16 * len(chunk)}\r\n\r\n".encode()
        )
        try:
            for _ in range(16):  # 4 MiB, most of it after the 403 is on its way
                sock.sendall(chunk)
        except OSError:
            pass  # the sidecar may stop reading once it has answered; the answer counts
        answer = bytearray()
        ending = "timeout"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                ending = "reset"
                break
            if not chunk:
                ending = "eof"
                break
            answer += chunk
    assert ending == "eof"
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert f"AccessPolicy {POLICY}".encode() in answer


@pytest.mark.parametrize("protocol", ["tcp", None])
def test_a_refused_tcp_caller_has_its_connection_reset_as_before(
    procs: Procs,  # noqa: F811
    pki: Pki,  # noqa: F811
    protocol: str | None,
) -> None:
    upstream = start_refusing_pair(procs, pki, protocol)
    with socket.create_connection(("127.0.0.1", upstream), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: web.default\r\n\r\n")
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
    assert data == b""  # closed (reset) with nothing written back
