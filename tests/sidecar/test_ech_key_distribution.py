"""ECH keys (RFC 9849) end to end, all real processes: `trellis ca serve` → `trellis
agent` → `trellis sidecar` replicas of web, and this test process as a workload of web
asking the agent's socket like a sidecar does (the harness of the STEK ring test).

The CA rotates every 2 s, so a key becomes previous and then goes within a test. The
keys must reach web's workloads only (db's private key never reaches this process), and
no process may write one down: every file under the processes' TMPDIR, their logs and
their admin answers are searched for every private key seen, in every encoding.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc

from ca.api._proto import session_keys_pb2
from ca.workload import HEADER_KEY, HEADER_VALUE
from sidecar.stek import SessionKeys
from tests.sidecar.dataplane.harness import Procs
from tests.support import wait_for

from . import test_stek_ring_distribution as stek_e2e
from .test_stek_ring_distribution import DB, METHOD, WEB, Mesh, _forms

procs = stek_e2e.procs  # its fixture: a TMPDIR per test, the processes stopped after

ADMIN_SOCKET = "ca-admin.sock"


def response(socket: Path) -> session_keys_pb2.STEKRingResponse:
    """The agent's whole answer for this process (attested as web), read once."""
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        call = channel.unary_stream(
            METHOD,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=session_keys_pb2.STEKRingResponse.FromString,
        )
        stream = call(
            session_keys_pb2.WatchSTEKRingRequest(),
            metadata=((HEADER_KEY, HEADER_VALUE),),
            timeout=15,
        )
        try:
            message: session_keys_pb2.STEKRingResponse = next(iter(stream))
        finally:
            stream.cancel()
    return message


def start_mesh(procs: Procs) -> Mesh:
    mesh = Mesh(procs)
    mesh.start_ca(mint=True, extra=["--admin-socket", str(procs.workdir / ADMIN_SOCKET)])
    mesh.start_agent()
    return mesh


def test_a_services_ech_keys_reach_its_workloads_rotate_and_are_never_written_down(
    procs: Procs,
) -> None:
    mesh = start_mesh(procs)
    sidecars = [mesh.sidecar("web-1"), mesh.sidecar("web-2")]
    private: dict[bytes, bytes] = {}  # every ECH private key seen, by public key
    current_keys: list[bytes] = []
    announced_next: bytes | None = None
    answers: list[str] = []
    deadline = time.monotonic() + 40
    while len(current_keys) < 3:  # two rotations of web's ECH key seen by this workload
        assert time.monotonic() < deadline, f"ECH keys seen: {len(current_keys)}"
        message = response(mesh.socket)
        (ring,) = message.rings
        assert ring.spiffe_id == WEB
        keys = list(ring.ech_keys)
        assert 2 <= len(keys) <= 3  # current, next, then the previous one while it lasts
        for key in keys:
            assert len(key.private_key) == 32 and key.public_name == "example.org"
            private.setdefault(key.public_key, key.private_key)
        if not current_keys or current_keys[-1] != keys[0].public_key:
            if current_keys:
                # The new current key was handed over as next before the rotation.
                assert keys[0].public_key == announced_next
                if len(keys) == 3:
                    assert keys[2].public_key == current_keys[-1]
            current_keys.append(keys[0].public_key)
        announced_next = keys[1].public_key
        public = {c.spiffe_id: c for c in message.ech_public}
        assert set(public) == {WEB, DB}
        assert all(k.private_key == b"" for c in public.values() for k in c.keys)
        time.sleep(0.3)

    # The sidecars hold what the agent hands this workload of their identity (ids only
    # in /config); their admin answers go into the search.
    def installed() -> bool:
        wanted = [k.config_id for k in response(mesh.socket).rings[0].ech_keys]
        views = [dict(s.describe()["stek_ring"]) for s in sidecars]
        return all(v["ech_config_ids"] == wanted and v["ech_services"] == 2 for v in views)

    wait_for(installed, 10, "both replicas on the agent's ECH keys")
    for sidecar in sidecars:
        for path in ("/metrics", "/config", "/healthz"):
            answers.append(sidecar.get(path)[1])
    admin = procs.workdir / ADMIN_SOCKET
    from ca.server.admin_client import fetch_admin

    published = fetch_admin(admin, "/ech")
    answers.append(json.dumps(published))
    services = {s["spiffe_id"]: s for s in published["services"]}
    assert set(services) == {WEB, DB}
    assert all(set(k) == {"config_id", "public_key", "public_name", "not_before", "not_after"}
               for s in services.values() for k in s["keys"])  # fmt: skip

    procs.stop_all()
    written = [p for p in procs.workdir.rglob("*") if p.is_file()]
    blobs = {str(p): p.read_bytes() for p in written}
    blobs["admin answers"] = "\n".join(answers).encode()
    for proc in (mesh.ca, mesh.agent, *(s.proc for s in sidecars)):
        assert proc is not None
        blobs[f"{proc.name} output"] = proc.output().encode()
    leaked = [
        (where, public_key.hex())
        for public_key, key in private.items()
        for where, blob in blobs.items()
        if any(form in blob for form in _forms(key))
    ]
    assert leaked == []


def test_a_sidecar_holds_its_services_ech_keys_and_the_public_keys_of_the_others() -> None:
    """The sidecar half alone (the agent's message built here): what SessionKeys keeps."""
    message = session_keys_pb2.STEKRingResponse()
    ring = message.rings.add(spiffe_id=WEB, rotation_seconds=60)
    ring.active.CopyFrom(
        session_keys_pb2.STEK(key_id=b"i" * 16, key=b"k" * 32, not_before=0, not_after=100)
    )
    ring.ech_keys.add(
        config_id=9, public_key=b"p" * 32, private_key=b"s" * 32, public_name="example.org",
        not_before=0, not_after=100,
    )  # fmt: skip
    db = message.ech_public.add(spiffe_id=DB)
    db.keys.add(
        config_id=3, public_key=b"q" * 32, public_name="example.org", not_before=0,
        not_after=50,
    )  # fmt: skip
    from ca.spiffeid import SpiffeId

    keys = SessionKeys(SpiffeId(WEB))
    told: list[int] = []
    keys.on_ech = lambda: told.append(1)
    assert keys.receive(message, 10.0)
    assert [k.config_id for k in keys.ech_keys_at(10.0)] == [9]
    assert [k.public_key for k in keys.ech_public_for(SpiffeId(DB), 10.0)] == [b"q" * 32]
    assert keys.ech_public_for(SpiffeId(DB), 60.0) == ()  # past its not_after
    assert "s" * 32 not in repr(keys.ech_keys)
    keys.receive(message, 11.0)
    assert told == [1]  # told once: the second message changed nothing
