"""Root and intermediate rotation of a mesh under traffic, with the real commands.

`trellis ca init` and `trellis ca intermediate` make the CA directory (root key and
cluster keys encrypted), `trellis ca serve`, `trellis agent`, two `trellis sidecar`s and an
echo app run as processes (the harness of tests/sidecar/dataplane), and a bounded load
loop sends requests through both sidecars the whole time, pausing past the pool's idle
timeout now and then so that the next request dials and handshakes afresh. The rotations
are the `trellis ca root ...` and `trellis ca intermediate rotate` commands as processes;
no process of the mesh is restarted, and no request may fail.

Workload SVIDs live 8 s and agent SVIDs 16 s, so every old chain is dead within half a
minute of the switch and each test stays well under a minute of rotation.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca.rotation import fingerprint, load_ledger
from tests.sidecar.dataplane.conftest import procs  # noqa: F401 (the fixture)
from tests.sidecar.dataplane.harness import (
    Procs,
    Sidecar,
    env,
    free_port,
    roundtrip,
    start_echo,
    start_sidecar,
    wait_for,
)

TD = "example.org"
CLIENT = f"spiffe://{TD}/ns/default/sa/client"
ECHO = f"spiffe://{TD}/ns/default/sa/echo"
TTL = 8  # seconds, workload SVIDs
AGENT_TTL = 16  # seconds, the agent's own SVID
MAX_REQUESTS = 20_000  # the load loop's bound, beside its time limit


@pytest.fixture(autouse=True)
def _passphrases(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inherited by every process the harness starts (its env() copies os.environ).
    monkeypatch.setenv("TRELLIS_ROOT_PASSPHRASE", "rotation root passphrase")
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", "rotation cluster keys")


def trellis(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
        check=False,
    )


def ok(*args: str) -> str:
    result = trellis(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


class Load(threading.Thread):
    """Requests through sidecar A -> sidecar B -> echo until stopped (bounded in count and
    time); a pause past the pool's 1 s idle timeout every 2 s makes the pool dial again."""

    def __init__(self, port: int, limit: float) -> None:
        super().__init__(daemon=True)
        self.port, self.limit = port, limit
        self.ok = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.limit
        pause_at = time.monotonic() + 2
        for index in range(MAX_REQUESTS):
            if self.stopping.is_set() or time.monotonic() > end:
                return
            payload = f"request {index} ".encode() * 20
            try:
                if roundtrip(self.port, payload, timeout=10) == payload:
                    self.ok += 1
                else:
                    self.failures.append(f"request {index}: wrong bytes")
            except OSError as exc:
                self.failures.append(f"request {index}: {exc!r}")
            if time.monotonic() > pause_at:
                self.stopping.wait(2.2)  # idle timeout (1 s) + sweep (1 s): the next dials
                pause_at = time.monotonic() + 2
            else:
                self.stopping.wait(0.03)

    def finish(self) -> None:
        self.stopping.set()
        self.join(30)
        assert not self.is_alive()


@dataclass
class Mesh:
    procs: Procs
    ca_dir: Path
    ca_log: Path
    sidecars: tuple[Sidecar, Sidecar]
    upstream: int

    def identities(self) -> list[dict[str, object]]:
        return [dict(s.describe()["identity"]) for s in self.sidecars]

    def roots_seen(self) -> list[set[str]]:
        """The serials of the roots each sidecar trusts, as the Workload API gave them."""
        return [set(i["bundles"][TD]) for i in self.identities()]  # type: ignore[index]

    def all_issued_after(self, moment: dt.datetime) -> bool:
        """Both sidecars hold an SVID signed after ``moment`` (notAfter - TTL > moment)."""
        for identity in self.identities():
            not_after = dt.datetime.fromisoformat(str(identity["not_after"]))
            if not_after - dt.timedelta(seconds=TTL) <= moment:
                return False
        return True

    def intermediate_reloads(self) -> int:
        return self.ca_log.read_text(errors="replace").count('"intermediate-reloaded"')


def _serial(path: Path) -> str:
    return format(x509.load_pem_x509_certificate(path.read_bytes()).serial_number, "x")


@pytest.fixture
def mesh(procs: Procs) -> Iterator[Mesh]:  # noqa: F811 (the imported fixture)
    work = procs.workdir
    ca_dir = work / "ca"
    ok("ca", "init", "--trust-domain", TD, "--dir", str(ca_dir))
    ok("ca", "intermediate", "--dir", str(ca_dir), "--cluster", "west")
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
            sys.executable, "-m", "trellis", "ca", "serve", "--dir", str(ca_dir),
            "--cluster", "west", "--listen", f"127.0.0.1:{ca_port}",
            "--attest-listen", f"127.0.0.1:{attest_port}", "--bundle-listen", "off",
            "--entries", str(work / "entries.yaml"), "--agent-ttl", f"{AGENT_TTL}s",
            "--sign-workers", "0", "--poll-interval", "0.5",
        ],
    )  # fmt: skip
    token_file = work / "join-token"
    ok("ca", "token", "create", "--dir", str(ca_dir), "--cluster", "west", "--node", "node-a",
       "--out", str(token_file))  # fmt: skip
    socket = work / "agent.sock"
    procs.start(
        "agent",
        [
            sys.executable, "-m", "trellis", "agent", "--socket", str(socket),
            "--node", "node-a", "--ca", f"127.0.0.1:{ca_port}",
            "--ca-attest", f"127.0.0.1:{attest_port}",
            "--trust-bundle", str(ca_dir / "root.crt"), "--join-token-file", str(token_file),
            "--data-dir", str(work / "agent-data"), "--admin", "off",
            "--sync-interval", "1s", "--backoff-cap", "1s",
        ],
    )  # fmt: skip
    wait_for(lambda: socket.is_socket() or not ca.alive(), 40, "the agent's socket")
    assert ca.alive(), ca.output()
    endpoint = f"unix://{socket}"
    echo = start_echo(procs)
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "workload_api_socket": endpoint,
            "spiffe_id": ECHO,
            "inbound": {
                "targets": {8080: {"app": f"127.0.0.1:{echo}", "allow": [{"exact": CLIENT}]}}
            },
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
    yield Mesh(procs, ca_dir, ca.log, (a, b), upstream)
    for proc in procs.running:
        assert proc.alive(), f"{proc.name} exited during the test:\n{proc.output()[-2000:]}"


def test_a_mesh_under_traffic_rotates_its_root_with_zero_failed_requests(mesh: Mesh) -> None:
    ca = str(mesh.ca_dir)
    old_root = _serial(mesh.ca_dir / "root.crt")
    load = Load(mesh.upstream, limit=150)
    load.start()
    wait_for(lambda: load.ok >= 20, 30, "traffic through both sidecars")

    # 1. prepare: the next root reaches every sidecar through CA -> agent -> Workload API.
    ok("ca", "root", "prepare", "--dir", ca)
    new_root = _serial(mesh.ca_dir / "next-root.crt")
    wait_for(
        lambda: all(seen == {old_root, new_root} for seen in mesh.roots_seen()),
        20,
        "both roots in both sidecars' bundles",
    )

    # 2. activate: the cluster intermediate is re-issued under the new root, and the CA
    # server signs with it without a restart; both sidecars renew onto it.
    reloads = mesh.intermediate_reloads()
    ok("ca", "root", "activate", "--dir", ca)
    wait_for(lambda: mesh.intermediate_reloads() > reloads, 20, "the CA server's reload")
    switched = dt.datetime.now(dt.UTC)
    wait_for(lambda: mesh.all_issued_after(switched), 3 * TTL, "SVIDs under the new root")

    # 3. retire: refused, in one line naming what is still valid, until the last SVID of
    # the old chain (workload or agent) has expired; then the old root leaves the bundle.
    refusals: list[str] = []
    deadline = time.monotonic() + AGENT_TTL + 3 * TTL
    while True:
        result = trellis("ca", "root", "retire", "--dir", ca)
        if result.returncode == 0:
            break
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert f"root {old_root} still anchors what is valid" in result.stderr
        assert "previous intermediate" in result.stderr
        refusals.append(result.stderr)
        assert time.monotonic() < deadline, refusals[-1]
        time.sleep(2)
    assert refusals, "retire was allowed while SVIDs of the old chain were valid"
    wait_for(
        lambda: all(seen == {new_root} for seen in mesh.roots_seen()),
        20,
        "only the new root in both sidecars' bundles",
    )
    # Handshakes that can only verify against the new root alone: two idle pauses more.
    after = load.ok
    wait_for(lambda: load.ok >= after + 20, 20, "traffic after the retirement")
    time.sleep(5)
    load.finish()
    assert load.failures == []
    assert load.ok > 100
    assert mesh.all_issued_after(switched)
    for sidecar in mesh.sidecars:
        assert sidecar.get("/readyz")[0] == 200


def test_a_mesh_under_traffic_rotates_its_intermediate_with_zero_failed_requests(
    mesh: Mesh,
) -> None:
    ca = str(mesh.ca_dir)
    old = x509.load_pem_x509_certificate(
        (mesh.ca_dir / "clusters/west/intermediate.crt").read_bytes()
    )
    load = Load(mesh.upstream, limit=120)
    load.start()
    wait_for(lambda: load.ok >= 20, 30, "traffic through both sidecars")

    reloads = mesh.intermediate_reloads()
    out = ok("ca", "intermediate", "rotate", "--dir", ca, "--cluster", "west")
    assert f"{old.serial_number:x} ->" in out
    wait_for(lambda: mesh.intermediate_reloads() > reloads, 20, "the CA server's reload")
    switched = dt.datetime.now(dt.UTC)
    wait_for(lambda: mesh.all_issued_after(switched), 3 * TTL, "SVIDs from the new intermediate")

    # The old intermediate's SVIDs stay valid (same root) until they expire: traffic runs
    # on until the CA server's record says the last of them has, and past that.
    record_path = mesh.ca_dir / "clusters/west/issued.json"
    old_fp = fingerprint(old.public_bytes(Encoding.DER))

    def old_chain_dead() -> bool:
        record = load_ledger(record_path).get(old_fp)
        return record is not None and not record.signing and record.valid_until < time.time()

    wait_for(old_chain_dead, AGENT_TTL + 3 * TTL, "the old intermediate's last SVID to expire")
    after = load.ok
    wait_for(lambda: load.ok >= after + 20, 20, "traffic after the old chain expired")
    time.sleep(3)
    load.finish()
    assert load.failures == []
    assert load.ok > 100
    assert json.loads(record_path.read_text())["intermediates"][old_fp]["signing"] is False
    for sidecar in mesh.sidecars:
        assert sidecar.get("/readyz")[0] == 200
