"""The CA's STEK rings: how they rotate (``StekLeader``, with an injected clock and RNG)
and who may stream them (``WatchSTEKRings`` on a real server, over mutual TLS on loopback,
with agents attested by join tokens)."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from ca.api import CaClient
from ca.api._proto import ca_pb2
from ca.server.stek import MAX_PREVIOUS, StekLeader
from ca.spiffeid import SpiffeId

from .conftest import attested, run, server_config, serving

WEB = SpiffeId("spiffe://example.org/ns/default/sa/web")
DB = SpiffeId("spiffe://example.org/ns/default/sa/db")
LOGGER = SpiffeId("spiffe://example.org/ns/default/sa/logger")
HOUR = 3600.0


def _counting_rng() -> Any:
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


def test_a_new_identity_gets_an_active_key_and_the_next_one_an_interval_ahead() -> None:
    leader = StekLeader(dt.timedelta(hours=1), rng=_counting_rng())
    assert leader.tick(1000.0, {WEB})
    (ring,) = leader.rings_for({WEB})
    assert ring.active.not_before == 1000.0
    assert ring.next.not_before == 1000.0 + HOUR
    assert ring.active.key_id != ring.next.key_id and ring.active.key != ring.next.key
    assert len(ring.active.key) == 32 and len(ring.active.key_id) == 16
    # A key opens tickets for its own hour and the 24 after it.
    assert ring.active.not_after == 1000.0 + 25 * HOUR
    assert not leader.tick(1000.0 + HOUR - 1, {WEB})


def test_rotation_promotes_the_published_next_key_and_keeps_the_old_one_for_opening() -> None:
    leader = StekLeader(dt.timedelta(hours=1), rng=_counting_rng())
    leader.tick(0.0, {WEB})
    (before,) = leader.rings_for({WEB})
    assert leader.tick(HOUR, {WEB})
    (after,) = leader.rings_for({WEB})
    assert after.active == before.next
    assert after.previous == (before.active,)
    assert after.next.not_before == 2 * HOUR
    assert leader.rotations == 1


def test_the_ring_keeps_at_most_24_previous_keys_after_many_rotations() -> None:
    leader = StekLeader(dt.timedelta(hours=1), rng=_counting_rng())
    leader.tick(0.0, {WEB})
    for hour in range(1, 41):
        leader.tick(hour * HOUR, {WEB})
    (ring,) = leader.rings_for({WEB})
    assert len(ring.previous) <= MAX_PREVIOUS
    assert all(k.not_after > 40 * HOUR for k in ring.previous)
    assert [k.not_before for k in ring.previous] == sorted(
        (k.not_before for k in ring.previous), reverse=True
    )


def test_a_late_tick_rotates_on_the_published_schedule_not_from_the_late_time() -> None:
    leader = StekLeader(dt.timedelta(hours=1), rng=_counting_rng())
    leader.tick(0.0, {WEB})
    leader.tick(3.5 * HOUR, {WEB})
    (ring,) = leader.rings_for({WEB})
    assert ring.active.not_before == 3 * HOUR
    assert ring.next.not_before == 4 * HOUR


def test_an_identity_without_entries_loses_its_ring() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(0.0, {WEB, DB})
    assert leader.tick(1.0, {WEB})
    assert [r.spiffe_id for r in leader.rings_for({WEB, DB})] == [WEB]


def test_no_key_appears_in_a_rings_repr() -> None:
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(0.0, {WEB})
    (ring,) = leader.rings_for({WEB})
    for key in (ring.active, ring.next):
        assert key.key.hex() not in repr(ring) and repr(key.key) not in repr(ring)


# -- WatchSTEKRings over gRPC -------------------------------------------------------------


def _raw_stream(client: CaClient, payload: bytes) -> Any:
    channel = client._main_channel()
    call = channel.unary_stream(
        "/trellis.ca.v1.CaService/WatchSTEKRings",
        request_serializer=lambda b: b,
        response_deserializer=ca_pb2.STEKRings.FromString,
    )
    return call(payload, timeout=10)


async def _first(stream: Any) -> ca_pb2.STEKRings:
    async for message in stream:
        return message  # type: ignore[no-any-return]
    raise AssertionError("the stream ended without a message")


def test_an_agent_gets_the_rings_of_its_own_nodes_identities_only(
    ca_dir: Path, entries_file: Path
) -> None:
    async def body() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            a = await attested(server, "node-a")
            b = await attested(server, "node-b")
            try:
                rings_a = await _first(a.watch_stek_rings())
                rings_b = await _first(b.watch_stek_rings())
            finally:
                await a.close()
                await b.close()
            assert {r.spiffe_id for r in rings_a.rings} == {str(WEB), str(LOGGER)}
            assert {r.spiffe_id for r in rings_b.rings} == {str(DB), str(LOGGER)}
            # The identity both nodes run shares one ring: that is what lets a ticket from a
            # replica on node-a open at a replica on node-b.
            (logger_a,) = [r for r in rings_a.rings if r.spiffe_id == str(LOGGER)]
            (logger_b,) = [r for r in rings_b.rings if r.spiffe_id == str(LOGGER)]
            assert logger_a == logger_b

    run(body())


def test_the_stream_sends_the_new_ring_on_every_rotation(ca_dir: Path, entries_file: Path) -> None:
    config = server_config(ca_dir, entries_file)
    config = type(config)(**{**config.__dict__, "stek_rotation": dt.timedelta(seconds=1)})

    async def body() -> None:
        async with serving(config) as server:
            client = await attested(server, "node-a")
            seen: list[bytes] = []
            try:
                async with asyncio.timeout(15):
                    async for message in client.watch_stek_rings():
                        (web,) = [r for r in message.rings if r.spiffe_id == str(WEB)]
                        if not seen or seen[-1] != web.active.key_id:
                            seen.append(web.active.key_id)
                        if len(seen) == 3:
                            break
            finally:
                await client.close()
            assert len(set(seen)) == 3

    run(body())


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (ca_pb2.WatchSTEKRingsRequest(node="node-b").SerializeToString(), "PERMISSION_DENIED"),
        (b"\xff\xff\xff\xff", "INVALID_ARGUMENT"),  # not a protobuf at all
        (ca_pb2.WatchSTEKRingsRequest(node="x" * 5000).SerializeToString(), "RESOURCE_EXHAUSTED"),
    ],
    ids=["another-node", "malformed", "oversized"],
)
def test_a_bad_stek_request_is_refused_and_sends_no_key(
    ca_dir: Path, entries_file: Path, payload: bytes, code: str
) -> None:
    config = server_config(ca_dir, entries_file, max_request_bytes=1024)

    async def body() -> None:
        async with serving(config) as server:
            client = await attested(server, "node-a")
            try:
                stream = _raw_stream(client, payload)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in stream:
                        raise AssertionError("a refused caller received a ring")
            finally:
                await client.close()
            assert refused.value.code().name == code

    run(body())


def test_an_agent_naming_its_own_node_gets_its_rings(ca_dir: Path, entries_file: Path) -> None:
    async def body() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            try:
                request = ca_pb2.WatchSTEKRingsRequest(node="node-a").SerializeToString()
                message = await _first(_raw_stream(client, request))
            finally:
                await client.close()
            assert {r.spiffe_id for r in message.rings} == {str(WEB), str(LOGGER)}

    run(body())


def test_a_caller_without_an_agent_svid_gets_no_ring(ca_dir: Path, entries_file: Path) -> None:
    async def body() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            # The attestation listener asks for no client certificate: no agent SVID.
            roots = server.store.root_cert_path.read_bytes()
            credentials = grpc.ssl_channel_credentials(roots)
            address = server.addresses["attest_listen"]
            options = [("grpc.ssl_target_name_override", "trellis-ca")]
            async with grpc.aio.secure_channel(address, credentials, options) as channel:
                call = channel.unary_stream(
                    "/trellis.ca.v1.CaService/WatchSTEKRings",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=ca_pb2.STEKRings.FromString,
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in call(ca_pb2.WatchSTEKRingsRequest(), timeout=10):
                        raise AssertionError("an unauthenticated caller received a ring")
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    run(body())
