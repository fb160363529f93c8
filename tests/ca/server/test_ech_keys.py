"""The CA's ECH keys (RFC 9849): per service ring, rotating with its STEKs (current, next,
previous), and what leaves the CA: private halves only inside the service's own ring, the
current public half of every service for everyone."""

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


def test_each_ring_starts_with_a_current_and_a_next_ech_key_named_for_the_trust_domain() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(T0, {WEB, DB})
    (web,) = leader.rings_for({WEB})
    key, upcoming = web.ech
    assert key.public_name == upcoming.public_name == "example.org"  # one outer name
    assert key.not_before == T0 and key.not_after == T0 + 2 * HOUR
    assert upcoming.not_before == T0 + HOUR and upcoming.config_id != key.config_id
    private = X25519PrivateKey.from_private_bytes(key.private_key)
    assert private.public_key().public_bytes_raw() == key.public_key
    (db,) = leader.rings_for({DB})
    assert db.ech[0].public_key != key.public_key  # a key per service


def test_at_a_rotation_the_next_ech_key_becomes_current_and_the_current_one_previous() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(T0, {WEB})
    first, second = leader.rings_for({WEB})[0].ech
    leader.tick(T0 + HOUR, {WEB})
    current, upcoming, previous = leader.rings_for({WEB})[0].ech
    # Every replica held `second` an interval before callers were told to seal to it.
    assert (current, previous) == (second, first)
    assert upcoming.not_before == T0 + 2 * HOUR
    assert len({current.config_id, upcoming.config_id, previous.config_id}) == 3
    leader.tick(T0 + 2 * HOUR, {WEB})
    keys = leader.rings_for({WEB})[0].ech
    assert (keys[0], keys[2]) == (upcoming, current)
    assert first not in keys  # past its not_after: a client holding it gets retry_configs


def test_after_a_long_pause_the_ech_keys_are_on_schedule_and_none_has_expired() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(T0, {WEB})
    leader.tick(T0 + 10 * HOUR, {WEB})  # ten rotations at once
    keys = leader.rings_for({WEB})[0].ech
    assert [k.not_before for k in keys] == [T0 + 10 * HOUR, T0 + 11 * HOUR, T0 + 9 * HOUR]
    assert all(k.not_after > T0 + 10 * HOUR for k in keys)


def test_consecutive_ech_keys_never_share_a_config_id() -> None:
    # An RNG that always answers the same bytes draws the same config id every time.
    leader = StekLeader(dt.timedelta(hours=1), rng=lambda n: bytes([7]) * n)
    leader.tick(T0, {WEB})
    leader.tick(T0 + HOUR, {WEB})
    ids = [k.config_id for k in leader.rings_for({WEB})[0].ech]
    assert len(set(ids)) == len(ids) == 3


def test_public_ech_halves_carry_no_private_key_and_no_repr_shows_one() -> None:
    leader = StekLeader(dt.timedelta(hours=1), rng=os.urandom)
    leader.tick(T0, {WEB, DB})
    public = dict(leader.public_ech())
    assert set(public) == {WEB, DB}
    assert all(k.private_key == b"" for keys in public.values() for k in keys)
    (current,) = public[WEB]  # callers seal to the current key only
    assert current.public_key == leader.rings_for({WEB})[0].ech[0].public_key
    key = leader.rings_for({WEB})[0].ech[0]
    assert key.private_key.hex() not in repr(key) and "private_key" not in repr(key)


def test_the_cas_message_carries_the_nodes_private_ech_keys_and_everyones_public_ones() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(T0, {WEB, DB})
    message = stek_rings_to_proto(leader.rings_for({WEB}), leader.public_ech())
    decoded = ca_pb2.STEKRings.FromString(message.SerializeToString())
    (ring,) = decoded.rings
    assert len(ring.ech_keys) == 2  # current and next
    assert all(len(k.private_key) == 32 and k.public_name == "example.org" for k in ring.ech_keys)
    assert [c.spiffe_id for c in decoded.ech_public] == [str(DB), str(WEB)]
    assert all(k.private_key == b"" for c in decoded.ech_public for k in c.keys)
