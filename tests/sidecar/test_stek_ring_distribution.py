"""STEK rings end to end, all real processes: `trellis ca serve` → `trellis agent` → two
`trellis sidecar` replicas of one identity, and this test process as a workload of that
identity asking the agent's socket like a sidecar does.

The CA rotates every 2 s (`--stek-rotation 2s`) so several rotations happen within a test.
Every process gets its own TMPDIR inside the test's work directory, so "every file the
processes wrote" is one directory tree (plus the agent's socket directory) to search.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from spiffe import WorkloadApiClient

from ca import JwtAuthority, RootAuthority, TrustDomain
from ca.api._proto import session_keys_pb2
from ca.spiffeid import SpiffeId
from ca.store import CaStore
from ca.workload import HEADER_KEY, HEADER_VALUE
from sidecar.stek import SessionKeys
from sidecar.tls import ClientConnection, HandshakeComplete, SessionTicket, TLSConfig
from sidecar.tls.tickets import StekRing
from sidecar.tls.ticketstore import TicketStore
from tests.sidecar.dataplane.harness import REPO, Proc, Procs, Sidecar, start_sidecar
from tests.support import free_port, wait_for

WEB = "spiffe://example.org/ns/default/sa/web"
DB = "spiffe://example.org/ns/default/sa/db"
METHOD = "/trellis.workload.v1.SessionKeys/WatchSTEKRing"
NOBODY = 65534
OTHER_GID = 54321
ROTATION = 2.0


@pytest.fixture
def procs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Procs]:
    workdir = Path(tempfile.mkdtemp(prefix="tr-stek-"))
    (workdir / "tmp").mkdir()
    # Children inherit os.environ (harness.env): their temporary files land in workdir.
    monkeypatch.setenv("TMPDIR", str(workdir / "tmp"))
    registry = Procs(workdir)
    try:
        yield registry
    finally:
        running = list(registry.running)
        registry.stop_all()
        for proc in running:  # shown by pytest only when the test failed
            print(f"--- {proc.name} (exit {proc.popen.returncode}) ---\n{proc.output()[-4000:]}")
        shutil.rmtree(workdir, ignore_errors=True)


class Mesh:
    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.work = procs.workdir
        self.socket = self.work / "agent.sock"
        self.ca_port, self.attest_port = free_port(), free_port()
        now = dt.datetime.now(dt.UTC)
        store = CaStore(self.work / "ca")
        root = RootAuthority.create(TrustDomain("example.org"), now=now)
        store.save_root(root, b"e2e-passphrase-123")
        store.save_intermediate(root.issue_intermediate("west", now=now), JwtAuthority.generate())
        # web: this uid and gid (the sidecars and this test); db: a uid nothing here runs as.
        (self.work / "entries.yaml").write_text(
            "entries:\n"
            f"  - id: web\n    spiffe_id: {WEB}\n"
            f"    selectors: [unix:uid:{os.getuid()}, unix:gid:{os.getgid()}]\n"
            "    nodes: [node-a]\n"
            f"  - id: db\n    spiffe_id: {DB}\n    selectors: [unix:uid:{NOBODY - 1}]\n"
            "    nodes: [node-a]\n"
        )
        self.ca: Proc | None = None
        self.agent: Proc | None = None
        self.token = ""

    def start_ca(self, *, mint: bool, extra: Sequence[str] = ()) -> None:
        argv = [
            sys.executable, "-m", "trellis", "ca", "serve", "--dir", str(self.work / "ca"),
            "--cluster", "west", "--listen", f"127.0.0.1:{self.ca_port}",
            "--attest-listen", f"127.0.0.1:{self.attest_port}", "--bundle-listen", "off",
            "--entries", str(self.work / "entries.yaml"), "--stek-rotation", f"{ROTATION:g}s",
            "--poll-interval", "0.2s",
        ]  # fmt: skip
        if mint:
            argv += ["--join-token", "node-a", "--print-join-tokens"]
        argv += extra
        name = "ca" if self.ca is None else f"ca-{len(self.procs.running)}"
        ca = self.ca = self.procs.start(name, argv)

        def ready() -> bool:
            if not ca.alive():
                raise AssertionError(f"CA exited: {ca.output()}")
            for line in ca.output().splitlines():
                if line.startswith("{"):
                    event = json.loads(line)
                    if event.get("event") == "join-token":
                        self.token = event["token"]
                    if event.get("event") == "ready" and (self.token or not mint):
                        return True
            return False

        wait_for(ready, 40, "the CA")

    def start_agent(self) -> None:
        token_file = self.work / "join-token"
        token_file.write_text(self.token)
        argv = [
            sys.executable, "-m", "trellis", "agent", "--socket", str(self.socket),
            "--node", "node-a", "--ca", f"127.0.0.1:{self.ca_port}",
            "--ca-attest", f"127.0.0.1:{self.attest_port}",
            "--trust-bundle", str(self.work / "ca" / "root.crt"),
            "--data-dir", str(self.work / "agent-data"), "--admin", "off",
            "--sync-interval", "1s", "--backoff-cap", "1s",
            "--join-token-file", str(token_file), "--log-level", "info",
        ]  # fmt: skip
        self.agent = self.procs.start("agent", argv)
        wait_for(self.socket.is_socket, 40, "the agent's socket")

    def sidecar(self, name: str, spiffe_id: str = WEB) -> Sidecar:
        config = {"workload_api_socket": f"unix://{self.socket}", "spiffe_id": spiffe_id}
        return start_sidecar(self.procs, name, config, extra_args=["--log-level", "info"])


def ring(socket: Path, spiffe_id: str = "") -> session_keys_pb2.STEKRing:
    """The agent's ring for this process (attested as web), read once."""
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        call = channel.unary_stream(
            METHOD,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=session_keys_pb2.STEKRingResponse.FromString,
        )
        stream = call(
            session_keys_pb2.WatchSTEKRingRequest(spiffe_id=spiffe_id),
            metadata=((HEADER_KEY, HEADER_VALUE),),
            timeout=15,
        )
        try:
            message = next(iter(stream))
        finally:
            stream.cancel()
    (only,) = message.rings
    return only


def _keys(message: session_keys_pb2.STEKRing) -> dict[bytes, bytes]:
    keys = [
        message.active,
        *message.previous,
        *([message.next] if message.HasField("next") else []),
    ]
    return {k.key_id: k.key for k in keys}


def _stek_config(sidecar: Sidecar) -> dict[str, object]:
    return dict(sidecar.describe()["stek_ring"])


def _forms(key: bytes) -> list[bytes]:
    """Every way a 32-byte key could be written down: raw, hex, base64 (and URL-safe)."""
    return [
        key,
        key.hex().encode(),
        key.hex().upper().encode(),
        base64.b64encode(key).rstrip(b"="),
        base64.urlsafe_b64encode(key).rstrip(b"="),
    ]


def test_two_replicas_hold_one_ring_that_rotates_and_no_key_is_ever_written_down(
    procs: Procs,
) -> None:
    mesh = Mesh(procs)
    mesh.start_ca(mint=True)
    mesh.start_agent()
    a, b = mesh.sidecar("web-1"), mesh.sidecar("web-2")
    seen: dict[bytes, bytes] = {}
    active_ids: list[bytes] = []
    configs: list[str] = []
    deadline = time.monotonic() + 40
    while len(active_ids) < 4:  # three rotations seen by this workload
        assert time.monotonic() < deadline, f"rotations seen: {len(active_ids) - 1}"
        current = ring(mesh.socket)
        seen.update(_keys(current))
        if not active_ids or active_ids[-1] != current.active.key_id:
            active_ids.append(current.active.key_id)
        time.sleep(0.3)

    def replicas_agree() -> bool:
        current = ring(mesh.socket)
        seen.update(_keys(current))
        views = [_stek_config(s) for s in (a, b)]
        configs.extend(json.dumps(s.describe()) for s in (a, b))
        return all(v["active_key_id"] == current.active.key_id.hex() for v in views)

    # Both replicas install the very ring the agent hands this workload of their identity.
    wait_for(replicas_agree, 10, "both replicas on the agent's active key")
    for sidecar in (a, b):
        view = _stek_config(sidecar)
        assert view["sealing_tickets"] is True
        metrics = sidecar.metrics()
        assert metrics["trellis_stek_ring_keys"] >= 3
        assert metrics["trellis_stek_rotations_total"] >= 1
        assert 0 <= metrics["trellis_stek_active_key_age_seconds"] <= 3 * ROTATION
        assert metrics['trellis_stek_decrypt_failures_total{reason="unknown_key"}'] == 0
        for path in ("/metrics", "/config", "/healthz", "/readyz"):
            configs.append(sidecar.get(path)[1])

    procs.stop_all()
    assert len(seen) >= 5
    written = [p for root in (procs.workdir,) for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in written) and len(written) > 5
    blobs = {str(p): p.read_bytes() for p in written}
    blobs["/config and /metrics answers"] = "\n".join(configs).encode()
    for proc in (mesh.ca, mesh.agent, a.proc, b.proc):
        assert proc is not None
        assert proc.output()  # the logs are in the searched files
    leaked = [
        (where, key_id.hex())
        for key_id, key in seen.items()
        for where, blob in blobs.items()
        if any(form in blob for form in _forms(key))
    ]
    assert leaked == []


def test_a_workload_of_one_identity_cannot_obtain_another_identitys_ring(procs: Procs) -> None:
    mesh = Mesh(procs)
    mesh.start_ca(mint=True)
    mesh.start_agent()
    assert ring(mesh.socket, WEB).spiffe_id == WEB  # entitled: served
    with pytest.raises(grpc.RpcError) as refused:
        ring(mesh.socket, DB)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert mesh.agent is not None

    def logged() -> bool:
        return any(
            "workload-api-refused" in line and "WatchSTEKRing" in line and DB in line
            for line in mesh.agent.output().splitlines()  # type: ignore[union-attr]
        )

    wait_for(logged, 10, "the agent's refusal line")
    # A process the agent attests (same uid, another gid) but no entry names gets nothing.
    script = (
        "import grpc, sys\n"
        "from tests.sidecar.test_stek_ring_distribution import ring\n"
        "try:\n"
        f"    ring(__import__('pathlib').Path({str(mesh.socket)!r}))\n"
        "except grpc.RpcError as exc:\n"
        "    print(exc.code().name)\n"
        "else:\n"
        "    print('SERVED')\n"
    )
    answer = subprocess.run(
        [sys.executable, "-c", script],
        group=OTHER_GID,
        extra_groups=[],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert answer.stdout.strip() == "PERMISSION_DENIED", answer.stderr


def test_a_ca_restart_keeps_the_agents_keys_and_a_cut_off_sidecar_ages_out(
    procs: Procs,
) -> None:
    mesh = Mesh(procs)
    mesh.start_ca(mint=True)
    mesh.start_agent()
    sidecar = mesh.sidecar("web-1")
    before = ring(mesh.socket)
    assert mesh.ca is not None
    procs.stop(mesh.ca)
    mesh.start_ca(mint=False)
    # The restarted CA made new keys it never had before; the agent merged them in front
    # of the ones it held, so tickets sealed before the restart still open.
    old_ids = set(_keys(before))

    def merged() -> bool:
        current = ring(mesh.socket)
        return current.active.key_id not in old_ids and before.active.key_id in {
            k.key_id for k in current.previous
        }

    wait_for(merged, 30, "the restarted CA's ring, merged with the agent's")

    def installed() -> bool:
        return _stek_config(sidecar)["active_key_id"] == ring(mesh.socket).active.key_id.hex()

    wait_for(installed, 10, "the sidecar on the new ring")
    store = TicketStore()
    config = _client_config(mesh, store)
    assert _handshake(sidecar.inbound_port, config)[1] >= 1  # tickets while it holds a ring
    # Cut the sidecar off: it keeps its ring, rotates to the next key it already holds,
    # then stops sealing tickets once that key's interval is over, and says so once.
    assert mesh.agent is not None
    procs.stop(mesh.agent)
    logged_before = len(sidecar.proc.output())
    assert _stek_config(sidecar)["keys"] >= 2

    def aged_out() -> bool:
        return _stek_config(sidecar)["sealing_tickets"] is False

    wait_for(aged_out, 4 * ROTATION + 5, "the cut-off sidecar to stop sealing tickets")
    view = _stek_config(sidecar)
    assert int(str(view["keys"])) >= 2  # old keys still open tickets until not_after
    store.clear()
    done, tickets = _handshake(sidecar.inbound_port, config)
    assert (done.session_resumed, tickets) == (False, 0)  # full handshakes, no tickets
    time.sleep(ROTATION)
    after = sidecar.proc.output()[logged_before:]
    lines = [line for line in after.splitlines() if "aged out" in line]
    assert len(lines) == 1, lines


def _client_config(mesh: Mesh, store: TicketStore) -> TLSConfig:
    """This process is attested as web too: its SVID from the agent, like any workload."""
    with WorkloadApiClient(f"unix://{mesh.socket}", default_timeout=15) as workload:
        svid = workload.fetch_x509_svid()
        bundles = workload.fetch_x509_bundles()
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None
    return TLSConfig(
        rng=os.urandom,
        certificate_chain=tuple(svid.cert_chain),
        private_key=svid.private_key,
        trust_bundles={"example.org": tuple(bundle.x509_authorities)},
        alpn_protocols=("h2",),
        ticket_store=store,
    )


def _handshake(port: int, config: TLSConfig) -> tuple[HandshakeComplete, int]:
    """One real TLS handshake with a sidecar's inbound port: what completed, and how many
    tickets the server sent (read for a bounded time after the handshake)."""
    client = ClientConnection(
        config,
        None,
        now=time.time(),
        endpoint="web-replicas",  # one slot for both: a ticket from either is offered
        expected_peer=SpiffeId(WEB),
    )
    done: HandshakeComplete | None = None
    tickets = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(1.0)
        for _ in range(50):  # bounded: a handful of flights, then two tickets
            out = client.data_to_send()
            if out:
                sock.sendall(out)
            if done is not None and tickets >= 2:
                break
            try:
                data = sock.recv(65536)
            except TimeoutError:
                if done is not None:
                    break
                continue
            if not data:
                break
            client.receive_data(data)
            for event in client.events():
                if isinstance(event, HandshakeComplete):
                    done = event
                elif isinstance(event, SessionTicket):
                    tickets += 1
    assert done is not None, "no handshake with the sidecar"
    return done, tickets


def test_a_ticket_issued_by_one_replica_resumes_at_the_other(procs: Procs) -> None:
    mesh = Mesh(procs)
    mesh.start_ca(mint=True)
    mesh.start_agent()
    a, b = mesh.sidecar("web-1"), mesh.sidecar("web-2")
    store = TicketStore()
    config = _client_config(mesh, store)

    def sealing() -> bool:
        return all(_stek_config(s)["sealing_tickets"] is True for s in (a, b))

    wait_for(sealing, 20, "both replicas holding the ring")
    first, tickets = _handshake(a.inbound_port, config)
    assert not first.session_resumed
    assert tickets >= 1 and len(store) >= 1
    second, _ = _handshake(b.inbound_port, config)
    assert second.session_resumed  # sealed by web-1, opened by web-2
    resumed = b.metrics()
    assert (
        resumed['tls_resumption_total{kind="ticket"}'] + resumed['tls_resumption_total{kind="psk"}']
        >= 1
    )
    assert resumed['trellis_stek_decrypt_failures_total{reason="unknown_key"}'] == 0


# -- the sidecar's own schedule, with an injected clock (no processes) ---------------------


def _stek(n: int, not_before: float) -> session_keys_pb2.STEK:
    return session_keys_pb2.STEK(
        key_id=bytes([n]) * 16, key=bytes([n]) * 32, not_before=not_before,
        not_after=not_before + 25 * ROTATION,
    )  # fmt: skip


def _message(active: int, at: float) -> session_keys_pb2.STEKRingResponse:
    response = session_keys_pb2.STEKRingResponse()
    response.rings.add(
        spiffe_id=WEB,
        active=_stek(active, at),
        next=_stek(active + 1, at + ROTATION),
        rotation_seconds=ROTATION,
    )
    return response


def test_a_sidecar_without_a_ring_seals_no_tickets_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = SessionKeys(SpiffeId(WEB))
    with caplog.at_level("WARNING", logger="sidecar.stek"):
        for second in range(5):
            keys.tick(float(second))
            keys.no_ring()
    assert keys.ring(5.0) is None
    assert len([r for r in caplog.records if "no STEK ring" in r.getMessage()]) == 1


def test_a_cut_off_sidecar_promotes_the_next_key_then_stops_sealing_when_it_ends() -> None:
    keys = SessionKeys(SpiffeId(WEB))
    told: list[StekRing | None] = []
    keys.on_ring = told.append
    assert keys.receive(_message(1, 100.0), 100.5)
    assert keys.ring(100.5) is keys.engine_ring and told == [keys.engine_ring]
    keys.tick(100.0 + ROTATION + 0.1)  # the agent is gone: the held next key takes over
    assert keys.stats(0).active_key_id == (bytes([2]) * 16).hex()
    assert keys.ring(100.0 + ROTATION + 0.1) is keys.engine_ring
    keys.tick(100.0 + 2 * ROTATION + 0.1)  # no successor: no more tickets
    assert keys.ring(100.0 + 2 * ROTATION + 0.1) is None
    assert told == [keys.engine_ring, None]
    assert keys.engine_ring.keys == 2  # both keys still open the tickets they sealed
    assert keys.receive(_message(3, 100.0 + 2 * ROTATION), 100.0 + 2 * ROTATION + 0.2)
    assert told[-1] is keys.engine_ring  # the agent is back: sealing again
