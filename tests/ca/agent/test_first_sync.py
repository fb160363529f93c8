"""Workload API calls that arrive before the agent can answer them.

The agent opens its socket at start-up, before its first sync with the CA (and before its
pod watch has delivered every pod), so a workload started alongside it may call first.
Such a call waits for the sync and is then answered as usual; if the sync does not come
within ``sync_wait`` (or the caller's own deadline), it is UNAVAILABLE -- which clients
retry -- and never PERMISSION_DENIED, since before the sync no entry is known. The CA here
answers FetchEntries only when the test opens its gate; the real-process version is in
``test_e2e_first_sync.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives import serialization

from ca import verify_x509_svid
from ca.agent.attestation import AttestationPending, Selector, WorkloadAttributes
from ca.agent.upstream import InProcessUpstream
from ca.agent.workload_api import WorkloadApiConfig
from ca.entries import EntrySet, RegistrationEntry
from ca.workload import method_path
from ca.workload import workload_pb2 as pb
from ca.x509svid import load_der_chain
from tests.ca.agent.conftest import WEB, LiveCa, entry, make_upstream, run, running_agent
from tests.ca.agent.test_faults import _get
from tests.ca.agent.test_workload_api import HEADER, _next, _stream, _target, _unary


class GatedUpstream(InProcessUpstream):
    """A CA that answers FetchEntries only once ``opened`` is set (attestation, signing and
    the bundle are immediate): the agent's first sync completes when the test says so."""

    def __init__(self, ca: LiveCa, entries: Sequence[RegistrationEntry]) -> None:
        super().__init__(ca.intermediate, ca.jwt, ca.bundle, entries, node="node-a")
        self.opened = asyncio.Event()

    async def fetch_entries(self) -> EntrySet:
        await self.opened.wait()
        return await super().fetch_entries()


class Arrivals:
    """A selector plugin that adds nothing and counts callers being attested: proof that a
    call has reached the agent's handler."""

    def __init__(self) -> None:
        self.count = 0

    def selectors(self, attributes: WorkloadAttributes) -> frozenset[Selector]:
        self.count += 1
        return frozenset()


class UnknownPod:
    """Like a pod the agent's watch has not delivered yet: pending until ``known``."""

    def __init__(self) -> None:
        self.known = False
        self.asked = 0

    def selectors(self, attributes: WorkloadAttributes) -> frozenset[Selector]:
        self.asked += 1
        if not self.known:
            raise AttestationPending("pod 1234 is not known to this agent yet")
        return frozenset()


async def _until(check: Callable[[], bool], what: str) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), 20)  # a hang guard, not a measurement
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status a call ends with: a stream's first read, or a unary call's answer."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await (call.read() if hasattr(call, "read") else call)
    return info.value.code(), info.value.details() or ""


def _every_method(channel: grpc.aio.Channel, timeout: float) -> dict[str, Any]:
    """One call of each Workload API method, each admissible once the agent has synced."""
    calls: dict[str, Any] = {}
    for name, request, response_type, streaming in (
        ("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse, True),
        ("FetchX509Bundles", pb.X509BundlesRequest(), pb.X509BundlesResponse, True),
        ("FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse, True),
        ("FetchJWTSVID", pb.JWTSVIDRequest(audience=["db"]), pb.JWTSVIDResponse, False),
        (
            "ValidateJWTSVID",
            pb.ValidateJWTSVIDRequest(audience="db", svid="a.b.c"),
            pb.ValidateJWTSVIDResponse,
            False,
        ),
    ):
        kind = channel.unary_stream if streaming else channel.unary_unary
        calls[name] = kind(
            method_path(name),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )(request, timeout=timeout, metadata=HEADER)
    return calls


def test_calls_made_before_the_first_sync_wait_for_it_then_get_the_right_svid(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> dict[str, Any]:
        upstream = GatedUpstream(live_ca, [entry()])
        arrivals = Arrivals()
        facts: dict[str, Any] = {}
        async with (
            running_agent(
                upstream, short_dir, wait_synced=False, admin_port=0, plugins=(arrivals,),
                workload_api=WorkloadApiConfig(sync_wait=30),
            ) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):  # fmt: skip
            port = agent.admin.port if agent.admin else 0
            facts["healthz_before"] = await asyncio.to_thread(_get, port, "/healthz")
            facts["readyz_before"] = await asyncio.to_thread(_get, port, "/readyz")
            svids = _stream(channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
            bundles = _stream(
                channel, "FetchX509Bundles", pb.X509BundlesRequest(), pb.X509BundlesResponse
            )
            first_svids = asyncio.create_task(_next(svids, timeout=30))
            first_bundles = asyncio.create_task(_next(bundles, timeout=30))
            jwt = asyncio.create_task(
                _unary(
                    channel, "FetchJWTSVID", pb.JWTSVIDRequest(audience=["db"]), pb.JWTSVIDResponse
                )
            )
            await _until(lambda: arrivals.count >= 3, "the three calls to reach the agent")
            facts["synced_while_they_waited"] = agent.rotator.synced.is_set()
            upstream.opened.set()  # the CA answers: the first sync completes
            facts["svids"], facts["bundles"], facts["jwt"] = await asyncio.gather(
                first_svids, first_bundles, jwt
            )
            facts["healthz_after"] = await asyncio.to_thread(_get, port, "/healthz")
            facts["readyz_after"] = await asyncio.to_thread(_get, port, "/readyz")
            svids.cancel()
            bundles.cancel()
        return facts

    facts = run(main())
    assert facts["synced_while_they_waited"] is False
    # The stream's first message is the full state: the SVID, its key and the bundle.
    (svid,) = facts["svids"].svids
    assert svid.spiffe_id == WEB
    chain = load_der_chain(svid.x509_svid)
    roots = load_der_chain(svid.bundle)
    verified = verify_x509_svid(chain, lambda td: roots, now=dt.datetime.now(dt.UTC))
    assert str(verified.spiffe_id) == WEB
    key = serialization.load_der_private_key(svid.x509_svid_key, None)
    assert key.public_key() == chain[0].public_key()
    assert list(facts["bundles"].bundles) == ["spiffe://example.org"]
    assert [s.spiffe_id for s in facts["jwt"].svids] == [WEB]
    # /healthz and /readyz agree with the Workload API: not ready until the first sync.
    status, body = facts["healthz_before"]
    assert (status, body["status"], body["synced"]) == (503, "starting", False)
    assert facts["readyz_before"] == (503, {"ready": False})
    status, body = facts["healthz_after"]
    assert (status, body["status"], body["synced"]) == (200, "ok", True)
    assert facts["readyz_after"] == (200, {"ready": True})


def test_calls_the_first_sync_does_not_come_in_time_for_are_unavailable_not_permission_denied(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> dict[str, tuple[grpc.StatusCode, str]]:
        upstream = GatedUpstream(live_ca, [entry()])  # the gate never opens
        async with (
            running_agent(
                upstream, short_dir, wait_synced=False,
                workload_api=WorkloadApiConfig(sync_wait=0.5),
            ) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):  # fmt: skip
            calls = _every_method(channel, timeout=30)
            codes = await asyncio.gather(*(_code(call) for call in calls.values()))
            return dict(zip(calls, codes, strict=True))

    outcomes = run(main())
    assert len(outcomes) == 5
    for method, (code, detail) in outcomes.items():
        assert code == grpc.StatusCode.UNAVAILABLE, method
        assert "first sync with the CA" in detail, method


def test_a_caller_whose_deadline_ends_before_the_sync_wait_still_hears_why(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> dict[str, tuple[grpc.StatusCode, str]]:
        upstream = GatedUpstream(live_ca, [entry()])
        async with (
            running_agent(
                upstream, short_dir, wait_synced=False,
                workload_api=WorkloadApiConfig(sync_wait=60),
            ) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):  # fmt: skip
            calls = _every_method(channel, timeout=2)
            codes = await asyncio.gather(*(_code(call) for call in calls.values()))
            return dict(zip(calls, codes, strict=True))

    for method, (code, detail) in run(main()).items():
        # Not a bare DEADLINE_EXCEEDED: the caller learns the agent is not synced yet.
        assert code == grpc.StatusCode.UNAVAILABLE, method
        assert "first sync with the CA" in detail, method


def test_a_caller_whose_pod_is_not_known_yet_waits_for_it_then_gets_its_svid(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> pb.X509SVIDResponse:
        pod = UnknownPod()
        async with (
            running_agent(
                make_upstream(live_ca, [entry()]), short_dir, plugins=(pod,),
                workload_api=WorkloadApiConfig(sync_wait=30),
            ) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):  # fmt: skip
            svids = _stream(channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
            first = asyncio.create_task(_next(svids, timeout=30))
            await _until(lambda: pod.asked >= 1, "the call to reach the agent")
            pod.known = True  # the pod watch delivers the caller's pod
            response: pb.X509SVIDResponse = await first
            svids.cancel()
            return response

    assert [s.spiffe_id for s in run(main()).svids] == [WEB]


def test_a_caller_whose_pod_stays_unknown_is_unavailable_not_permission_denied(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> tuple[grpc.StatusCode, str, int]:
        pod = UnknownPod()
        async with (
            running_agent(
                make_upstream(live_ca, [entry()]), short_dir, plugins=(pod,),
                workload_api=WorkloadApiConfig(sync_wait=0.5),
            ) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):  # fmt: skip
            code, detail = await _code(
                _stream(channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
            )
            return code, detail, pod.asked

    code, detail, asked = run(main())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "pod 1234 is not known to this agent yet" in detail
    assert asked > 1  # asked again while it waited, not refused at the first answer
