"""The agent's STEK rings: what it keeps across a CA restart (``merge_ring``), and who may
stream them from ``trellis.workload.v1.SessionKeys`` on the real Workload API socket
(SO_PEERCRED attestation of this test process, over a real Unix socket).

The CA leg here is the CA's own ring code (``ca.server.stek.StekLeader`` and the message
the CA's shell builds) fed to the agent in process, because these tests are about the
socket's admission rules; the gRPC leg to a real ``trellis ca serve`` is exercised in
tests/ca/server/test_stek.py and tests/sidecar/test_stek_ring_distribution.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from ca.agent import InProcessUpstream
from ca.agent.stek import MAX_PREVIOUS, StekStore, rings_from_proto
from ca.api._proto import ca_pb2, session_keys_pb2
from ca.entries import RegistrationEntry
from ca.server.grpc_shell import stek_rings_to_proto
from ca.server.stek import StekLeader
from ca.spiffeid import SpiffeId
from ca.workload import HEADER_KEY, HEADER_VALUE

from .conftest import WEB, LiveCa, entry, run, running_agent

DB = "spiffe://example.org/ns/default/sa/db"
METHOD = "/trellis.workload.v1.SessionKeys/WatchSTEKRing"
NOBODY = 65534


class StekUpstream(InProcessUpstream):
    """An in-process upstream that also streams the rings a ``StekLeader`` makes, as the
    CA's gRPC shell encodes them."""

    def __init__(self, *args: Any, leader: StekLeader, ids: Sequence[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.leader = leader
        self.ids = {SpiffeId(i) for i in ids}
        self.leader.tick(0.0 + _now(), self.ids)

    async def watch_stek_rings(self) -> AsyncIterator[ca_pb2.STEKRings]:
        yield stek_rings_to_proto(self.leader.rings_for(self.ids))
        await asyncio.Event().wait()  # a stream the CA keeps open


def _now() -> float:
    return dt.datetime.now(dt.UTC).timestamp()


def _upstream(ca: LiveCa, entries: Sequence[RegistrationEntry]) -> StekUpstream:
    return StekUpstream(
        ca.intermediate,
        ca.jwt,
        ca.bundle,
        entries,
        node="node-a",
        leader=StekLeader(dt.timedelta(hours=1)),
        ids=[str(e.spiffe_id) for e in entries],
    )


async def _watch(
    socket: Path, payload: bytes, *, header: bool = True
) -> session_keys_pb2.STEKRingResponse:
    async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
        call = channel.unary_stream(
            METHOD,
            request_serializer=lambda b: b,
            response_deserializer=session_keys_pb2.STEKRingResponse.FromString,
        )
        metadata = ((HEADER_KEY, HEADER_VALUE),) if header else ()
        async for message in call(payload, metadata=metadata, timeout=10):
            return message  # type: ignore[no-any-return]
    raise AssertionError("the stream ended without a ring")


def _request(spiffe_id: str = "") -> bytes:
    return session_keys_pb2.WatchSTEKRingRequest(spiffe_id=spiffe_id).SerializeToString()


def _two_identities() -> list[RegistrationEntry]:
    return [entry(WEB), entry(DB, [f"unix:uid:{NOBODY}"])]


def test_a_sidecar_gets_the_ring_of_the_identity_it_is_attested_for(
    live_ca: LiveCa, short_dir: Path
) -> None:
    upstream = _upstream(live_ca, _two_identities())

    async def body() -> None:
        async with running_agent(upstream, short_dir) as agent:
            message = await _watch(agent.config.socket_path, _request())
            (ring,) = message.rings
            assert ring.spiffe_id == WEB
            (expected,) = upstream.leader.rings_for({SpiffeId(WEB)})
            assert ring.active.key == expected.active.key
            assert ring.next.key == expected.next.key

    run(body())


def test_a_sidecar_attested_as_web_asking_for_the_db_ring_is_refused_and_logged(
    live_ca: LiveCa, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = _upstream(live_ca, _two_identities())

    async def body() -> None:
        async with running_agent(upstream, short_dir) as agent:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _watch(agent.config.socket_path, _request(DB))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    with caplog.at_level(logging.WARNING, logger="trellis.agent.workload_api"):
        run(body())
    (line,) = [r for r in caplog.records if r.getMessage() == "workload-api-refused"]
    fields = line.__dict__["fields"]
    assert fields["method"] == "WatchSTEKRing"
    assert fields["code"] == "PERMISSION_DENIED"
    assert DB in fields["reason"]
    assert fields["pid"] == os.getpid()


def test_a_caller_with_no_identity_on_this_node_gets_no_ring(
    live_ca: LiveCa, short_dir: Path
) -> None:
    # The only entry is for another uid: this process is attested, but entitled to nothing.
    upstream = _upstream(live_ca, [entry(DB, [f"unix:uid:{NOBODY}"])])

    async def body() -> None:
        async with running_agent(upstream, short_dir, wait_synced=True) as agent:
            for wanted in ("", DB):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _watch(agent.config.socket_path, _request(wanted))
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    run(body())


@pytest.mark.parametrize(
    ("payload", "header", "code"),
    [
        (_request(), False, grpc.StatusCode.INVALID_ARGUMENT),
        (b"\xff\xff\xff\xff", True, grpc.StatusCode.INVALID_ARGUMENT),
        (_request("spiffe://Example.org/../web"), True, grpc.StatusCode.INVALID_ARGUMENT),
        (
            _request("spiffe://example.org/" + "a" * 70_000),
            True,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ],
    ids=["no-security-header", "not-a-request", "not-a-spiffe-id", "oversized"],
)
def test_a_malformed_ring_request_is_refused_without_a_key(
    live_ca: LiveCa, short_dir: Path, payload: bytes, header: bool, code: grpc.StatusCode
) -> None:
    upstream = _upstream(live_ca, _two_identities())

    async def body() -> None:
        async with running_agent(upstream, short_dir) as agent:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _watch(agent.config.socket_path, payload, header=header)
            assert refused.value.code() == code
            # The agent goes on serving the entitled caller.
            message = await _watch(agent.config.socket_path, _request(WEB))
            assert [r.spiffe_id for r in message.rings] == [WEB]

    run(body())


def test_keys_held_before_a_ca_restart_keep_opening_tickets_after_it() -> None:
    web = SpiffeId(WEB)
    before, after = StekLeader(dt.timedelta(hours=1)), StekLeader(dt.timedelta(hours=1))
    now = 1_000_000.0
    before.tick(now - 7200, {web})
    before.tick(now - 10, {web})  # two rotations: an active key and two previous ones
    store = StekStore()
    store.update(rings_from_proto(stek_rings_to_proto(before.rings_for({web}))), now)
    (held,) = store.rings_for({web})
    after.tick(now, {web})  # the restarted CA: new keys only
    store.update(rings_from_proto(stek_rings_to_proto(after.rings_for({web}))), now)
    (merged,) = store.rings_for({web})
    (fresh,) = after.rings_for({web})
    assert merged.active.key == fresh.active.key
    assert merged.next is not None and merged.next.key == fresh.next.key
    kept = {k.key_id for k in merged.previous}
    assert held.active.key_id in kept
    assert {k.key_id for k in held.previous} <= kept
    # The old CA's next key never sealed anything anywhere: not kept.
    assert held.next is not None and held.next.key_id not in kept
    assert len(merged.previous) <= MAX_PREVIOUS


def test_a_ring_with_a_short_key_from_the_ca_is_refused() -> None:
    message = ca_pb2.STEKRings()
    ring = message.rings.add(spiffe_id=WEB)
    ring.active.CopyFrom(ca_pb2.STEK(key_id=b"k" * 16, key=b"short", not_before=1, not_after=2))
    with pytest.raises(ValueError, match="32-byte key"):
        rings_from_proto(message)
