"""SVID rotation with the real thing: `trellis ca serve` → `trellis agent` → two sidecars.

Entries give each sidecar its own SPIFFE ID with a 30 s TTL (rotation at about half-life).
Requests run continuously through both sidecars for ~36 s, the agent is restarted early
on, and idle pauses make the pool dial fresh connections across the rotations: no request
may fail, both sidecars must have moved to a new SVID, and the handshakes after rotation
must have used it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
import time
from pathlib import Path

from ca import JwtAuthority, RootAuthority, TrustDomain
from ca.store import CaStore

from .conftest import CLIENT, ECHO
from .harness import Procs, free_port, roundtrip, start_echo, start_sidecar, wait_for

TTL = 30


def _start_ca(procs: Procs) -> tuple[int, int, str]:
    work = procs.workdir
    now = dt.datetime.now(dt.UTC)
    store = CaStore(work / "ca")
    root = RootAuthority.create(TrustDomain("example.org"), now=now)
    store.save_root(root, b"e2e-passphrase-123")
    store.save_intermediate(root.issue_intermediate("west", now=now), JwtAuthority.generate())
    entries = "entries:\n"
    for name, spiffe_id in (("client", CLIENT), ("echo", ECHO)):
        entries += (
            f"  - id: {name}\n    spiffe_id: {spiffe_id}\n"
            f"    selectors: [unix:uid:{os.getuid()}]\n    nodes: [node-a]\n"
            f"    ttl: {TTL}s\n"
        )
    (work / "entries.yaml").write_text(entries)
    ca_port, attest_port = free_port(), free_port()
    ca = procs.start(
        "ca",
        [
            sys.executable, "-m", "trellis", "ca", "serve", "--dir", str(work / "ca"),
            "--cluster", "west", "--listen", f"127.0.0.1:{ca_port}",
            "--attest-listen", f"127.0.0.1:{attest_port}", "--bundle-listen", "off",
            "--entries", str(work / "entries.yaml"), "--join-token", "node-a",
            "--print-join-tokens",
        ],
    )  # fmt: skip
    token: list[str] = []

    def minted() -> bool:
        if not ca.alive():
            raise AssertionError(f"CA exited: {ca.output()}")
        for line in ca.output().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "join-token":
                    token.append(event["token"])
                    return True
        return False

    wait_for(minted, 40, "the CA's join token")
    return ca_port, attest_port, token[0]


def _agent_argv(procs: Procs, ca_port: int, attest_port: int, socket: Path) -> list[str]:
    work = procs.workdir
    return [
        sys.executable, "-m", "trellis", "agent", "--socket", str(socket), "--node", "node-a",
        "--ca", f"127.0.0.1:{ca_port}", "--ca-attest", f"127.0.0.1:{attest_port}",
        "--trust-bundle", str(work / "ca" / "root.crt"), "--data-dir", str(work / "agent-data"),
        "--admin", "off", "--sync-interval", "1s", "--backoff-cap", "1s",
    ]  # fmt: skip


class _Traffic(threading.Thread):
    def __init__(self, port: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.seconds = port, seconds
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        end = time.monotonic() + self.seconds
        pause_at = time.monotonic() + 3
        index = 0
        while time.monotonic() < end:
            payload = f"request {index} ".encode() * 50
            try:
                if roundtrip(self.port, payload, timeout=10) == payload:
                    self.ok += 1
                else:
                    self.failures.append(f"request {index}: wrong bytes")
            except OSError as exc:
                self.failures.append(f"request {index}: {exc!r}")
            index += 1
            if time.monotonic() > pause_at:
                # Past the idle timeout (1 s) plus the sweep period (1 s): the next
                # request dials anew.
                time.sleep(2.2)
                pause_at = time.monotonic() + 3
            else:
                time.sleep(0.03)


def test_svids_rotate_under_continuous_traffic_with_zero_failed_requests(procs: Procs) -> None:
    ca_port, attest_port, token = _start_ca(procs)
    socket = procs.workdir / "agent.sock"
    argv = _agent_argv(procs, ca_port, attest_port, socket)
    agent = procs.start("agent", [*argv, "--join-token", token])
    wait_for(socket.is_socket, 40, "the agent's socket")
    endpoint = f"unix://{socket}"
    echo = start_echo(procs)
    target = {"app": f"127.0.0.1:{echo}", "allow": [{"exact": CLIENT}]}
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "workload_api_socket": endpoint,
            "spiffe_id": ECHO,
            "inbound": {"targets": {8080: target}},
        },
    )
    upstream = free_port()
    a = start_sidecar(
        procs,
        "sidecar-a",
        {
            "workload_api_socket": endpoint,
            "spiffe_id": CLIENT,
            "pool": {"idle_timeout": "1s"},
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
    first = {s.proc.name: s.describe()["identity"] for s in (a, b)}
    assert first["sidecar-a"]["spiffe_id"] == CLIENT and first["sidecar-b"]["spiffe_id"] == ECHO

    traffic = _Traffic(upstream, TTL * 1.2)
    traffic.start()
    # Restarting the agent must not cost a request: sidecars keep their SVIDs meanwhile.
    time.sleep(2)
    procs.stop(agent)
    procs.start("agent-2", argv)
    traffic.join(TTL * 1.2 + 30)
    assert not traffic.is_alive()
    assert traffic.failures == []
    assert traffic.ok > 100
    for sidecar in (a, b):
        identity = sidecar.describe()["identity"]
        assert identity["serial"] != first[sidecar.proc.name]["serial"], sidecar.proc.name
        assert dt.datetime.fromisoformat(identity["not_after"]) > dt.datetime.fromisoformat(
            first[sidecar.proc.name]["not_after"]
        )
        assert sidecar.get("/readyz")[0] == 200
    # The traffic outlived the first SVIDs, and the pool dialled after each idle pause: the
    # last handshakes can only have succeeded with the rotated SVIDs on both sides.
    now = dt.datetime.now(dt.UTC)
    for identity in first.values():
        assert now > dt.datetime.fromisoformat(identity["not_after"])
    metrics = a.metrics()
    assert metrics['trellis_sidecar_tls_handshakes_total{direction="outbound"}'] >= 4
    assert metrics["trellis_sidecar_svid_updates_total"] >= 2
