"""The agent's ECH keys (RFC 9849): a sidecar gets its own service's ECH key pairs and
every service's public keys on ``trellis.workload.v1.SessionKeys`` (the real Workload API
socket, SO_PEERCRED attestation of this test process); what the CA sends that the agent
must not pass on is refused.

The CA leg is the CA's own code (``StekLeader`` and the message its gRPC shell builds) fed
in process, as in test_stek.py; tests/sidecar/test_ech_key_distribution.py runs the real
``trellis ca serve``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ca.agent.stek import StekStore, ech_public_from_proto, rings_from_proto
from ca.api._proto import ca_pb2
from ca.server.grpc_shell import stek_rings_to_proto
from ca.server.stek import StekLeader
from ca.spiffeid import SpiffeId

from .conftest import WEB, LiveCa, run, running_agent
from .test_stek import DB, StekUpstream, _request, _two_identities, _watch


class EchUpstream(StekUpstream):
    """The CA's message with the public ECH keys of every service, as `ca serve` sends it."""

    async def watch_stek_rings(self) -> AsyncIterator[ca_pb2.STEKRings]:
        yield stek_rings_to_proto(self.leader.rings_for(self.ids), self.leader.public_ech())
        await asyncio.Event().wait()


def test_a_sidecar_gets_its_services_ech_key_pairs_and_every_services_public_keys(
    live_ca: LiveCa, short_dir: Path
) -> None:
    entries = _two_identities()
    upstream = EchUpstream(
        live_ca.intermediate,
        live_ca.jwt,
        live_ca.bundle,
        entries,
        node="node-a",
        leader=StekLeader(dt.timedelta(hours=1)),
        ids=[str(e.spiffe_id) for e in entries],
    )

    async def body() -> None:
        async with running_agent(upstream, short_dir) as agent:
            message = await _watch(agent.config.socket_path, _request())
            (ring,) = message.rings  # web only: this process is attested as web
            (expected,) = upstream.leader.rings_for({SpiffeId(WEB)})
            assert [k.private_key for k in ring.ech_keys] == [k.private_key for k in expected.ech]
            public = {c.spiffe_id: c for c in message.ech_public}
            assert set(public) == {WEB, DB}
            # db's key pair stays with db's sidecars: here only its public half.
            (db_ring,) = upstream.leader.rings_for({SpiffeId(DB)})
            # The current key only: what db's callers seal to.
            assert [k.public_key for k in public[DB].keys] == [db_ring.ech[0].public_key]
            assert all(k.private_key == b"" for c in message.ech_public for k in c.keys)

    run(body())


def _message_with_public_key(private_key: bytes) -> ca_pb2.STEKRings:
    message = ca_pb2.STEKRings()
    config = message.ech_public.add(spiffe_id=DB)
    config.keys.add(
        config_id=1,
        public_key=b"p" * 32,
        private_key=private_key,
        public_name="example.org",
        not_before=1,
        not_after=2,
    )
    return message


def test_a_public_ech_config_carrying_a_private_key_is_refused() -> None:
    # Passed on, it would hand db's key to every workload on every node.
    with pytest.raises(ValueError, match="ECH private key sent"):
        ech_public_from_proto(_message_with_public_key(b"s" * 32))
    assert ech_public_from_proto(_message_with_public_key(b""))[0][0] == SpiffeId(DB)


def test_a_ring_whose_ech_key_has_no_private_half_is_refused() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(1_000_000.0, {SpiffeId(WEB)})
    message = stek_rings_to_proto(leader.rings_for({SpiffeId(WEB)}))
    message.rings[0].ech_keys[0].private_key = b""
    with pytest.raises(ValueError, match="ECH private key missing"):
        rings_from_proto(message)


def test_a_new_set_of_public_ech_keys_alone_is_a_change_the_streams_send() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    web, db = SpiffeId(WEB), SpiffeId(DB)
    leader.tick(1_000_000.0, {web, db})
    store = StekStore()
    rings = rings_from_proto(stek_rings_to_proto(leader.rings_for({web})))
    assert store.update(rings, 1_000_000.0, leader.public_ech())
    assert not store.update(rings, 1_000_000.0, leader.public_ech())
    leader.tick(1_000_000.0, {web, db, SpiffeId("spiffe://example.org/ns/x/sa/new")})
    assert store.update(rings, 1_000_000.0, leader.public_ech())
