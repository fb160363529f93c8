"""The CA's ECH keys (RFC 9849): one per service ring, rotating with its STEKs, current
and previous, and what leaves the CA: private halves only inside the service's own ring,
public halves of every service for everyone."""

from __future__ import annotations

import datetime as dt
import os

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ca.api._proto import ca_pb2
from ca.server.grpc_shell import stek_rings_to_proto
from ca.server.stek import StekLeader
from ca.spiffeid import SpiffeId

WEB = SpiffeId("spiffe://example.org/ns/default/sa/web")
DB = SpiffeId("spiffe://example.org/ns/default/sa/db")
HOUR = 3600.0
T0 = 1_000_000.0


def test_each_ring_starts_with_one_ech_key_whose_public_name_is_the_trust_domain() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(T0, {WEB, DB})
    (web,) = leader.rings_for({WEB})
    (key,) = web.ech
    assert key.public_name == "example.org"  # the same outer name for every service
    assert key.not_before == T0 and key.not_after == T0 + 2 * HOUR
    private = X25519PrivateKey.from_private_bytes(key.private_key)
    assert private.public_key().public_bytes_raw() == key.public_key
    (db,) = leader.rings_for({DB})
    assert db.ech[0].public_key != key.public_key  # a key per service


def test_a_rotation_makes_a_new_current_ech_key_and_keeps_only_the_one_before() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(T0, {WEB})
    first = leader.rings_for({WEB})[0].ech[0]
    leader.tick(T0 + HOUR, {WEB})
    current, previous = leader.rings_for({WEB})[0].ech
    assert previous == first and current.public_key != first.public_key
    assert current.not_before == T0 + HOUR
    leader.tick(T0 + 2 * HOUR, {WEB})
    keys = leader.rings_for({WEB})[0].ech
    assert [k.public_key for k in keys] == [keys[0].public_key, current.public_key]
    assert first not in keys  # past its not_after: a client holding it gets retry_configs


def test_a_long_pause_leaves_one_fresh_ech_key_and_no_expired_one() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(T0, {WEB})
    leader.tick(T0 + 10 * HOUR, {WEB})  # ten rotations at once
    (key,) = leader.rings_for({WEB})[0].ech
    assert key.not_after > T0 + 10 * HOUR


def test_consecutive_ech_keys_never_share_a_config_id() -> None:
    # An RNG that always answers the same bytes draws the same config id every time.
    leader = StekLeader(dt.timedelta(hours=1), rng=lambda n: bytes([7]) * n)
    leader.tick(T0, {WEB})
    leader.tick(T0 + HOUR, {WEB})
    current, previous = leader.rings_for({WEB})[0].ech
    assert current.config_id != previous.config_id


def test_public_ech_halves_carry_no_private_key_and_no_repr_shows_one() -> None:
    leader = StekLeader(dt.timedelta(hours=1), rng=os.urandom)
    leader.tick(T0, {WEB, DB})
    public = dict(leader.public_ech())
    assert set(public) == {WEB, DB}
    assert all(k.private_key == b"" for keys in public.values() for k in keys)
    key = leader.rings_for({WEB})[0].ech[0]
    assert key.private_key.hex() not in repr(key) and "private_key" not in repr(key)


def test_the_cas_message_carries_the_nodes_private_ech_keys_and_everyones_public_ones() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(T0, {WEB, DB})
    message = stek_rings_to_proto(leader.rings_for({WEB}), leader.public_ech())
    decoded = ca_pb2.STEKRings.FromString(message.SerializeToString())
    (ring,) = decoded.rings
    (key,) = ring.ech_keys
    assert len(key.private_key) == 32 and key.public_name == "example.org"
    assert [c.spiffe_id for c in decoded.ech_public] == [str(DB), str(WEB)]
    assert all(k.private_key == b"" for c in decoded.ech_public for k in c.keys)
