"""``GrpcUpstream``: CaError translation, channel replacement, and following root rotation.

A stand-in for ``CaClient`` records what the adapter does; the real client against a real
``trellis ca serve`` is exercised in ``test_e2e_pyspiffe.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from ca import RootAuthority, TrustBundle
from ca.agent.grpc_upstream import GrpcUpstream
from ca.agent.upstream import UpstreamRefused, UpstreamUnavailable
from ca.api import BundleUpdate, CaError
from tests.ca.agent.conftest import TD, LiveCa, run


class FakeClient:
    def __init__(self, svid: Any, roots: TrustBundle, script: list[Any]) -> None:
        self.agent_svid = svid
        self.roots = roots
        self.script = script
        self.closed = False
        self.set_roots: list[TrustBundle] = []
        self.max_batch: int | None = None
        self.batches: list[list[Any]] = []

    async def fetch_entries(self) -> Any:
        outcome = self.script.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def batch_new_x509_svids(self, requests: Any) -> Any:
        self.batches.append(list(requests))
        await asyncio.sleep(0)  # both calls are in flight before either fails
        return await self.fetch_entries()

    async def watch_bundles(self) -> AsyncIterator[BundleUpdate]:
        for bundle in self.script:
            yield BundleUpdate(bundle)

    def set_trust_roots(self, roots: TrustBundle) -> None:
        self.set_roots.append(roots)

    async def close(self) -> None:
        self.closed = True


def _upstream(live_ca: LiveCa, script: list[Any]) -> tuple[GrpcUpstream, list[FakeClient]]:
    made: list[FakeClient] = []

    def factory(svid: Any, roots: TrustBundle) -> Any:
        made.append(FakeClient(svid, roots, script))
        return made[-1]

    return GrpcUpstream(factory, live_ca.bundle, agent_svid="svid"), made  # type: ignore[arg-type]


def test_unavailable_is_retryable_and_replaces_the_channel(live_ca: LiveCa) -> None:
    upstream, made = _upstream(live_ca, [CaError(grpc.StatusCode.UNAVAILABLE, "down"), "ok"])

    async def main() -> Any:
        with pytest.raises(UpstreamUnavailable):
            await upstream.fetch_entries()
        return await upstream.fetch_entries()

    assert run(main()) == "ok"
    assert len(made) == 2 and made[0].closed and made[1].agent_svid == "svid"


def test_rate_limiting_is_retryable_but_keeps_the_channel(live_ca: LiveCa) -> None:
    upstream, made = _upstream(live_ca, [CaError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow")])
    with pytest.raises(UpstreamUnavailable):
        run(upstream.fetch_entries())
    assert len(made) == 1


def test_a_refusal_is_not_retryable(live_ca: LiveCa) -> None:
    upstream, made = _upstream(live_ca, [CaError(grpc.StatusCode.PERMISSION_DENIED, "no")])
    with pytest.raises(UpstreamRefused) as info:
        run(upstream.fetch_entries())
    assert info.value.reason == "permission-denied" and len(made) == 1


def test_new_roots_in_the_bundle_become_the_clients_trust_roots_once(live_ca: LiveCa) -> None:
    new_root = RootAuthority.create(TD, now=dt.datetime.now(dt.UTC))
    rotated = live_ca.bundle.with_x509_authorities([new_root.certificate])
    upstream, made = _upstream(live_ca, [live_ca.bundle, rotated, rotated])

    async def main() -> list[TrustBundle]:
        return [u.bundle async for u in upstream.watch_bundle()]

    assert len(run(main())) == 3
    assert made[0].set_roots == [rotated]
    assert upstream.trust_roots is rotated


def test_two_calls_failing_on_one_channel_replace_it_once(live_ca: LiveCa) -> None:
    down = CaError(grpc.StatusCode.UNAVAILABLE, "down")
    upstream, made = _upstream(live_ca, [down, down, ["ok"]])

    async def main() -> Any:
        outcomes = await asyncio.gather(
            upstream.batch_new_x509_svids([]),
            upstream.batch_new_x509_svids([]),
            return_exceptions=True,
        )
        assert all(isinstance(o, UpstreamUnavailable) for o in outcomes)
        return await upstream.batch_new_x509_svids([])

    assert run(main()) == ["ok"]
    assert len(made) == 2 and made[0].closed and not made[1].closed
    assert upstream.reconnects == 1


def test_a_batch_above_the_cas_limit_goes_out_in_chunks_and_comes_back_in_order(
    live_ca: LiveCa,
) -> None:
    upstream, made = _upstream(live_ca, [["a", "b", "c"], ["d", "e", "f"], ["g", "h"]])
    made[0].max_batch = 3
    result = run(upstream.batch_new_x509_svids(list("ABCDEFGH")))  # type: ignore[arg-type]
    assert result == list("abcdefgh")
    assert made[0].batches == [list("ABC"), list("DEF"), list("GH")]


def test_a_batch_within_the_limit_or_with_no_limit_known_is_one_call(live_ca: LiveCa) -> None:
    upstream, made = _upstream(live_ca, [["a", "b", "c"], ["x"]])
    made[0].max_batch = 3
    assert run(upstream.batch_new_x509_svids(list("ABC"))) == list("abc")  # type: ignore[arg-type]
    made[0].max_batch = None
    run(upstream.batch_new_x509_svids(list("ABCDE")))  # type: ignore[arg-type]
    assert made[0].batches == [list("ABC"), list("ABCDE")]


def test_a_refused_chunk_fails_the_whole_batch(live_ca: LiveCa) -> None:
    denied = CaError(grpc.StatusCode.PERMISSION_DENIED, "not yours")
    upstream, made = _upstream(live_ca, [["a", "b"], denied])
    made[0].max_batch = 2
    with pytest.raises(UpstreamRefused):
        run(upstream.batch_new_x509_svids(list("ABCD")))  # type: ignore[arg-type]
    assert made[0].batches == [list("AB"), list("CD")]


def test_the_learnt_limit_survives_a_channel_replacement(live_ca: LiveCa) -> None:
    down = CaError(grpc.StatusCode.UNAVAILABLE, "down")
    upstream, made = _upstream(live_ca, [down, ["a", "b"], ["c"]])
    made[0].max_batch = 2

    async def main() -> Any:
        with pytest.raises(UpstreamUnavailable):
            await upstream.batch_new_x509_svids(list("ABC"))  # type: ignore[arg-type]
        return await upstream.batch_new_x509_svids(list("ABC"))  # type: ignore[arg-type]

    assert run(main()) == list("abc")
    assert made[1].max_batch == 2 and made[1].batches == [list("AB"), list("C")]
