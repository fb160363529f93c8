"""Outages with real processes: the CA, then the agent, killed while traffic flows.

The mesh is ``trellis up``'s (``trellis.up.mesh.Mesh``): ``trellis ca serve``, ``trellis
agent``, the demo echo server and two ``trellis sidecar`` processes, with a short SVID TTL.
A thread in the test is the client app: one new TCP connection per request to the load
sidecar's upstream port (so every request is a new CONNECT stream, authorised anew by the
echo sidecar), POST /echo, the body checked. It counts every failure.

Two promises, and where one ends the other begins:
* An outage shorter than what is left of the SVIDs' lifetime fails no request. Agents
  renew at half-life, so that is at least about half a TTL; the sidecars keep their
  pooled connection, and once the component is back, fresh SVIDs replace the old ones
  before they expire (the pool re-dials at the old notAfter).
* Past the SVIDs' notAfter the mesh fails closed. No connection carries a new stream on
  an expired identity (the sidecars drain it, ``peer_certificate_expired`` /
  ``local_certificate_expired``), and a new handshake is refused, so requests in that
  window fail; they work again within seconds of the restart.
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

SVID_TTL = dt.timedelta(seconds=30)
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


EXPIRY = "trellis_sidecar_svid_expiry_timestamp_seconds"
DRAINED = "trellis_sidecar_connections_closed_by_us_total"
# Seconds of SVID life left when the component comes back: a restarted agent needs 1-3 s
# to attest, sync and push fresh SVIDs on an idle machine, several more beside a busy suite.
MARGIN = 10.0
COUNTERS = ("trellis_sidecar_connections_closed", "trellis_sidecar_streams")


def _log_tails(mesh: Mesh, lines: int = 15) -> str:
    """The end of each sidecar's log and its connection and stream counters, for a
    failure message."""
    assert mesh.run_dir is not None
    tails = []
    for log in sorted((mesh.run_dir / "logs").glob("sidecar-*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log.name}\n" + "\n".join(text))
    for sidecar in SIDECARS:
        with urllib.request.urlopen(mesh.url(f"{sidecar}_admin", "/metrics"), timeout=2) as r:
            counters = [
                line
                for line in r.read().decode().splitlines()
                if line.startswith(COUNTERS) and not line.endswith(" 0.0")
            ]
        tails.append(f"--- {sidecar} metrics\n" + "\n".join(counters))
    return "\n".join(tails)


def _metric(mesh: Mesh, sidecar: str, name: str, labels: str = "") -> float:
    """One sample from a sidecar's /metrics (0 when absent)."""
    with urllib.request.urlopen(mesh.url(f"{sidecar}_admin", "/metrics"), timeout=2) as r:
        text = r.read().decode()
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def _svid_life_left(mesh: Mesh) -> float:
    """Seconds until the first of the sidecars' SVIDs expires."""
    return min(_metric(mesh, s, EXPIRY) for s in SIDECARS) - time.time()


def _restart_and_recover(mesh: Mesh, load: LoadLoop, component: str) -> float:
    """Restart ``component``; the seconds until both sidecars hold fresh SVIDs and 40
    more requests were sent."""
    held = {s: _metric(mesh, s, EXPIRY) for s in SIDECARS}
    _restart(mesh, component)
    restarted = time.monotonic()
    wait_for(
        lambda: all(_ready(mesh, s) and _metric(mesh, s, EXPIRY) > held[s] for s in SIDECARS),
        45,
        f"fresh SVIDs after the {component} restarted",
    )
    recovered = time.monotonic() - restarted
    sent = load.sent
    wait_for(lambda: load.sent >= sent + 40, 15, "requests after recovery")
    return recovered


def _outage_within_svid_life(mesh: Mesh, load: LoadLoop, component: str) -> float:
    """Kill ``component`` just after the sidecars' SVIDs were renewed, keep it down for
    all but `MARGIN` seconds of what is left of their life, restart it."""
    first = {s: _metric(mesh, s, EXPIRY) for s in SIDECARS}
    wait_for(
        lambda: all(_metric(mesh, s, EXPIRY) > first[s] for s in SIDECARS),
        SVID_TTL.total_seconds(),
        "both sidecars to receive a renewed SVID",
    )
    _kill(mesh, component)
    down = _svid_life_left(mesh) - MARGIN
    assert down >= 5, f"only {down:.1f}s of outage fit before the SVIDs expire"
    sent = load.sent
    time.sleep(down)
    assert load.sent >= sent + int(down * RATE / 2), "the load loop stalled"
    return _restart_and_recover(mesh, load, component)


@pytest.mark.parametrize("component", ["ca", "agent"])
def test_an_outage_shorter_than_the_svid_life_fails_no_request(
    mesh_under_load: tuple[Mesh, LoadLoop], component: str
) -> None:
    mesh, load = mesh_under_load
    recovered = _outage_within_svid_life(mesh, load, component)
    load.stop()
    print(f"\n{component} outage: {load.sent} requests, recovered {recovered:.1f}s after restart")
    assert load.failures == [], f"{load.failures[:3]}\n{_log_tails(mesh)}"
    others = {"ca": ["agent"], "agent": [f"sidecar-{s}" for s in SIDECARS]}[component]
    assert all(mesh.children[name].alive() for name in others)


def test_the_ca_down_past_svid_expiry_fails_closed_then_recovers_after_restart(
    mesh_under_load: tuple[Mesh, LoadLoop],
) -> None:
    """No request is served on an expired identity: the pooled connection is drained at
    notAfter and new handshakes are refused until the CA is back."""
    mesh, load = mesh_under_load
    _kill(mesh, "ca")
    # At most one TTL: every SVID was issued less than a TTL ago.
    wait_for(
        lambda: all(_svid_expired(mesh, s) for s in SIDECARS),
        SVID_TTL.total_seconds() + 10,
        "the sidecars' SVIDs to expire with the CA down",
    )
    expired_at = len(load.failures)
    ok = load.ok
    wait_for(lambda: len(load.failures) >= expired_at + 10, 15, "requests refused after expiry")
    assert load.ok <= ok + 1, "a request was served on an expired identity"
    drained = sum(
        _metric(mesh, s, DRAINED, f'reason="{reason}"')
        for s in SIDECARS
        for reason in ("peer_certificate_expired", "local_certificate_expired")
    )
    assert drained >= 1, "no connection was drained at notAfter"
    recovered = _restart_and_recover(mesh, load, "ca")
    failed = len(load.failures)
    sent = load.sent
    wait_for(lambda: load.sent >= sent + 40, 15, "requests after recovery")
    load.stop()
    print(f"\nCA outage past expiry: {load.sent} requests, {failed} refused while expired")
    assert len(load.failures) == failed, load.failures[failed : failed + 5]
    assert recovered < 45
