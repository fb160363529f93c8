"""Outages with real processes: the CA, then the agent, killed while traffic flows.

The mesh is ``trellis up``'s (``trellis.up.mesh.Mesh``): ``trellis ca serve``, ``trellis
agent``, the demo echo server and two ``trellis sidecar`` processes, with a short SVID TTL.
A thread in the test is the client app: one new TCP connection per request to the load
sidecar's upstream port (so every request is a new CONNECT stream, authorised anew by the
echo sidecar), POST /echo, the body checked. It counts every failure.

What keeps a request working while the CA (or the agent) is down past the SVIDs' expiry:
the two sidecars' pooled mTLS connection, established while the SVIDs were valid. TLS
checks certificate validity at the handshake only, and the pool keeps a session that
carries streams (idle timeout 60 s, keepalive PINGs answered), so new streams ride it. A
*new* handshake in that window would fail, by design: the echo sidecar refuses an expired
client certificate, and the load sidecar has nothing fresher to present. So "0 failed
requests" across an expiry holds only while the pooled connection survives; these tests
show that it does, and that fresh SVIDs arrive after the restart.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support import wait_for
from trellis.demo.wire import parse_response_head, request_head
from trellis.up.mesh import Mesh, MeshConfig
from trellis.up.processes import Child, spawn

pytestmark = pytest.mark.slow

SVID_TTL = dt.timedelta(seconds=20)
RATE = 20.0  # requests per second from the test's client
MAX_REQUESTS = 4000  # bounds the load loop whatever happens (200 s at RATE)
SIDECARS = ("load", "echo")


@dataclass
class LoadLoop:
    """The client app: paced requests, each on its own connection, every outcome kept."""

    host: str
    port: int
    ok: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="load-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    @property
    def sent(self) -> int:
        return self.ok + len(self.failures)

    def _run(self) -> None:
        started = time.monotonic()
        for index in range(MAX_REQUESTS):
            if self._stop.is_set():
                return
            try:
                self._request(index)
                self.ok += 1
            except Exception as exc:  # every failure, of any kind, is counted
                self.failures.append((time.monotonic() - started, f"{type(exc).__name__}: {exc}"))
            self._stop.wait(max(0.0, started + (index + 1) / RATE - time.monotonic()))

    def _request(self, index: int) -> None:
        body = b"request %d" % index
        with socket.create_connection((self.host, self.port), timeout=5.0) as sock:
            sock.sendall(request_head("POST", "/echo", "echo", len(body)) + body)
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"closed after {len(received)} bytes of the head")
                received += chunk
            head, _, rest = received.partition(b"\r\n\r\n")
            response = parse_response_head(head)
            while len(rest) < response.content_length:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed inside the body")
                rest += chunk
        assert response.status == 200, f"status {response.status}"
        assert rest == body, f"echoed {rest[:40]!r}"


def _readiness(mesh: Mesh, sidecar: str) -> tuple[int, str]:
    """The sidecar's /readyz: 200, or 503 with the reason (e.g. "no valid SVID yet")."""
    try:
        with urllib.request.urlopen(mesh.url(f"{sidecar}_admin", "/readyz"), timeout=2) as r:
            return int(r.status), r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc)


def _ready(mesh: Mesh, sidecar: str) -> bool:
    return _readiness(mesh, sidecar)[0] == 200


def _svid_expired(mesh: Mesh, sidecar: str) -> bool:
    status, reason = _readiness(mesh, sidecar)
    return status == 503 and "no valid SVID" in reason


def _kill(mesh: Mesh, name: str) -> None:
    """SIGKILL: no goodbye to peers, as when a node or a pod dies."""
    child = mesh.children[name]
    os.kill(child.pid, signal.SIGKILL)
    child.stop()  # reaps it and closes its pipes


def _restart(mesh: Mesh, name: str) -> Child:
    """The same command line again, as a supervisor (kubelet, systemd) would run it."""
    old = mesh.children[name]
    assert mesh.run_dir is not None
    args = old.process.args
    assert isinstance(args, list)
    argv = [str(arg) for arg in args][3:]  # drop "python -m trellis"
    child = spawn(
        f"{name}-restarted",
        argv,
        mesh.run_dir / "logs",
        {"TMPDIR": str(mesh.run_dir / "tmp")},
    )
    mesh.children[name] = child  # same place in the stop order
    return child


@pytest.fixture
def mesh_under_load() -> Iterator[tuple[Mesh, LoadLoop]]:
    config = MeshConfig(svid_ttl=SVID_TTL, start_load=False, probe_policy=False)
    with Mesh(config) as mesh:
        load = LoadLoop(*mesh.upstream)
        load.start()
        try:
            wait_for(lambda: load.ok >= 20, 30, "traffic through both sidecars")
            yield mesh, load
        finally:
            load.stop()


def _outage_across_svid_expiry(mesh: Mesh, load: LoadLoop, component: str) -> float:
    """Kill ``component``, keep it down until both sidecars' SVIDs have expired (their
    /readyz says so), restart it; the seconds until both hold fresh SVIDs again."""
    _kill(mesh, component)
    before = load.sent
    # At most one TTL: every SVID was issued less than a TTL ago.
    wait_for(
        lambda: all(_svid_expired(mesh, s) for s in SIDECARS),
        SVID_TTL.total_seconds() + 10,
        f"the sidecars' SVIDs to expire with the {component} down",
    )
    # Traffic still flowed while they expired, and keeps flowing on expired SVIDs.
    sent = load.sent
    wait_for(lambda: load.sent >= sent + 20, 10, "requests on expired SVIDs")
    assert load.sent - before > 20
    _restart(mesh, component)
    restarted = time.monotonic()
    wait_for(
        lambda: all(_ready(mesh, s) for s in SIDECARS),
        45,
        f"fresh SVIDs after the {component} restarted",
    )
    recovered = time.monotonic() - restarted
    sent = load.sent
    wait_for(lambda: load.sent >= sent + 40, 15, "requests after recovery")
    return recovered


def test_the_ca_down_across_svid_expiry_fails_no_request_and_recovers_after_restart(
    mesh_under_load: tuple[Mesh, LoadLoop],
) -> None:
    mesh, load = mesh_under_load
    recovered = _outage_across_svid_expiry(mesh, load, "ca")
    load.stop()
    print(f"\nCA outage: {load.sent} requests, recovered {recovered:.1f}s after the restart")
    assert load.failures == [], load.failures[:5]
    assert mesh.children["agent"].alive()


def test_the_agent_down_across_svid_expiry_fails_no_request_and_recovers_after_restart(
    mesh_under_load: tuple[Mesh, LoadLoop],
) -> None:
    mesh, load = mesh_under_load
    recovered = _outage_across_svid_expiry(mesh, load, "agent")
    load.stop()
    print(f"\nagent outage: {load.sent} requests, recovered {recovered:.1f}s after the restart")
    assert load.failures == [], load.failures[:5]
    assert all(mesh.children[f"sidecar-{s}"].alive() for s in SIDECARS)
