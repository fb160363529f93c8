"""``Batcher``: group commit of signing requests -- coalescing, bounds, failures, cancellation.

The ``send`` stand-in records every call and, when asked to, holds it open until the test
releases it, so "a call is in flight" is a state the test controls rather than a timing.
Loop turns are counted (``settle``), never seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from ca.agent import Rotator, RotatorConfig
from ca.agent.batcher import Batcher, BatcherClosed, BatchQueueFull
from ca.agent.rotator import MAX_BATCH
from ca.agent.upstream import InProcessUpstream, UpstreamRefused, UpstreamUnavailable
from ca.keys import PrivateKey
from ca.x509svid import X509Svid
from tests.ca.agent.conftest import LiveCa, entry, make_upstream, run


class Send:
    """Records calls; ``hold`` keeps each call open until ``release`` (or ``fail``)."""

    def __init__(self, *, hold: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.hold = hold
        self._gates: list[asyncio.Future[Exception | None]] = []

    async def __call__(self, items: Sequence[str]) -> list[str]:
        self.calls.append(list(items))
        if self.hold:
            gate: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
            self._gates.append(gate)
            error = await gate
            if error is not None:
                raise error
        return [f"signed:{item}" for item in items]

    def release(self, index: int, error: Exception | None = None) -> None:
        self._gates[index].set_result(error)


async def settle(turns: int = 5) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def start(batcher: Batcher[str, str], *items: str) -> list[asyncio.Task[str]]:
    return [asyncio.create_task(batcher.submit(item)) for item in items]


def test_a_lone_request_leaves_at_once_without_waiting_for_a_timer() -> None:
    async def main() -> tuple[list[list[str]], str]:
        send = Send()
        batcher: Batcher[str, str] = Batcher(send)
        (task,) = start(batcher, "a")
        await settle()
        calls = list(send.calls)  # sent within a few loop turns, before any timer could fire
        return calls, await task

    calls, result = run(main())
    assert calls == [["a"]]
    assert result == "signed:a"


def test_requests_made_in_the_same_loop_turn_leave_together() -> None:
    async def main() -> list[list[str]]:
        send = Send()
        batcher: Batcher[str, str] = Batcher(send)
        await asyncio.gather(*start(batcher, "a", "b", "c"))
        return send.calls

    assert run(main()) == [["a", "b", "c"]]


def test_what_arrives_while_the_calls_are_in_flight_goes_out_in_one_next_call() -> None:
    async def main() -> tuple[list[list[str]], list[str]]:
        send = Send(hold=True)
        batcher: Batcher[str, str] = Batcher(send, max_in_flight=2)
        first = start(batcher, "a")
        await settle()
        second = start(batcher, "b")  # a slot is free: leaves at once
        await settle()
        later = []
        for item in ("c", "d", "e"):  # both slots busy: these wait, one turn apart
            later += start(batcher, item)
            await settle()
        assert send.calls == [["a"], ["b"]] and batcher.waiting == 3
        send.release(0)
        await settle()
        send.release(1)
        send.release(2)
        results = await asyncio.gather(*first, *second, *later)
        return send.calls, results

    calls, results = run(main())
    assert calls == [["a"], ["b"], ["c", "d", "e"]]
    assert results == [f"signed:{x}" for x in "abcde"]


def test_batches_never_exceed_max_batch() -> None:
    async def main() -> list[list[str]]:
        send = Send()
        batcher: Batcher[str, str] = Batcher(send, max_batch=3, max_in_flight=1)
        await asyncio.gather(*start(batcher, *"abcdefg"))
        return send.calls

    assert run(main()) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]


def test_a_failing_call_fails_exactly_its_requests_and_the_next_batch_still_goes() -> None:
    async def main() -> tuple[list[Any], list[list[str]]]:
        send = Send(hold=True)
        batcher: Batcher[str, str] = Batcher(send, max_in_flight=1)
        carried = start(batcher, "a", "b")
        await settle()
        behind = start(batcher, "c", "d")
        await settle()
        send.release(0, UpstreamRefused("entry-not-authorized", "not this node"))
        await settle()
        send.release(1)
        outcomes = await asyncio.gather(*carried, *behind, return_exceptions=True)
        return outcomes, send.calls

    outcomes, calls = run(main())
    assert calls == [["a", "b"], ["c", "d"]]
    assert all(isinstance(o, UpstreamRefused) for o in outcomes[:2])
    assert outcomes[2:] == ["signed:c", "signed:d"]


def test_an_answer_with_the_wrong_number_of_results_fails_that_call() -> None:
    async def short(items: Sequence[str]) -> list[str]:
        return ["only-one"]

    async def main() -> list[Any]:
        batcher: Batcher[str, str] = Batcher(short)
        return await asyncio.gather(*start(batcher, "a", "b"), return_exceptions=True)

    outcomes = run(main())
    assert all(isinstance(o, UpstreamUnavailable) and o.reason == "short-batch" for o in outcomes)


def test_a_caller_cancelled_while_waiting_takes_its_request_out_of_the_queue() -> None:
    async def main() -> tuple[list[list[str]], str]:
        send = Send(hold=True)
        batcher: Batcher[str, str] = Batcher(send, max_in_flight=1)
        first = start(batcher, "a")
        await settle()
        gone, kept = start(batcher, "b", "c")
        await settle()
        gone.cancel()
        await settle()
        assert batcher.waiting == 1
        send.release(0)
        await settle()
        send.release(1)
        await first[0]
        with pytest.raises(asyncio.CancelledError):
            await gone
        return send.calls, await kept

    calls, kept = run(main())
    assert calls == [["a"], ["c"]]
    assert kept == "signed:c"


def test_a_caller_cancelled_after_its_request_left_does_not_disturb_the_others() -> None:
    async def main() -> str:
        send = Send(hold=True)
        batcher: Batcher[str, str] = Batcher(send)
        gone, kept = start(batcher, "a", "b")
        await settle()
        gone.cancel()
        await settle()
        send.release(0)
        return await kept

    assert run(main()) == "signed:b"


def test_the_queue_is_bounded_and_says_so_at_once() -> None:
    async def main() -> tuple[BaseException | None, int]:
        send = Send(hold=True)
        batcher: Batcher[str, str] = Batcher(send, max_in_flight=1, max_pending=2)
        tasks = start(batcher, "a")
        await settle()
        tasks += start(batcher, "b", "c")
        await settle()
        overflow = start(batcher, "d")
        await settle()
        error = overflow[0].exception()
        waiting = batcher.waiting
        send.release(0)
        await settle()
        send.release(1)
        await asyncio.gather(*tasks)
        return error, waiting

    error, waiting = run(main())
    assert isinstance(error, BatchQueueFull) and isinstance(error, UpstreamUnavailable)
    assert error.reason == "agent-queue-full"
    assert waiting == 2


def test_close_fails_waiting_and_in_flight_requests_and_refuses_new_ones() -> None:
    async def main() -> list[Any]:
        send = Send(hold=True)
        batcher: Batcher[str, str] = Batcher(send, max_in_flight=1)
        tasks = start(batcher, "a")
        await settle()
        tasks += start(batcher, "b")
        await settle()
        await batcher.close()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await batcher.submit("c")
        except BatcherClosed as exc:
            outcomes.append(exc)
        return outcomes

    outcomes = run(main())
    assert len(outcomes) == 3
    assert all(isinstance(o, BatcherClosed) and o.reason == "agent-stopping" for o in outcomes)


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "3", None])
def test_limits_that_are_not_positive_integers_are_refused(bad: Any) -> None:
    for name in ("max_batch", "max_in_flight", "max_pending"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            Batcher(Send(), **{name: bad})


# -- the rotator's use of it ------------------------------------------------------------------


class FailSecondCall:
    """An upstream whose second BatchNewX509SVID call fails (the CA went away mid-round)."""

    def __init__(self, inner: InProcessUpstream) -> None:
        self.inner = inner
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def batch_new_x509_svids(
        self, requests: Sequence[tuple[str, PrivateKey]]
    ) -> list[X509Svid]:
        self.batches.append(len(requests))
        if len(self.batches) == 2:
            raise UpstreamUnavailable("unavailable", "CA went away")
        return await self.inner.batch_new_x509_svids(requests)


def _many(count: int) -> list[Any]:
    return [
        entry(f"spiffe://example.org/ns/default/sa/w{i}", entry_id=f"w{i}") for i in range(count)
    ]


def test_the_rotator_sends_a_large_round_in_batches_of_at_most_max_batch(
    live_ca: LiveCa,
) -> None:
    count = 2 * MAX_BATCH + 50

    async def main() -> tuple[InProcessUpstream, Rotator]:
        upstream = make_upstream(live_ca, _many(count))
        rotator = Rotator(upstream, config=RotatorConfig())
        await rotator.establish_identity()
        await rotator.sync_once()
        await rotator.issuer.close()
        return upstream, rotator

    upstream, rotator = run(main())
    assert len(rotator.cache.svids) == count
    assert upstream.calls["batch_new_x509_svids"] == 3
    assert rotator.issuer.items_sent == count


def test_a_failed_batch_in_a_rotator_round_loses_only_its_own_entries(live_ca: LiveCa) -> None:
    count = 2 * MAX_BATCH + 50

    async def main() -> tuple[FailSecondCall, int, BaseException | None, int]:
        upstream = FailSecondCall(make_upstream(live_ca, _many(count)))
        rotator = Rotator(upstream, config=RotatorConfig())  # type: ignore[arg-type]
        await rotator.establish_identity()
        error: BaseException | None = None
        try:
            await rotator.sync_once()
        except UpstreamUnavailable as exc:
            error = exc
        after_failure = len(rotator.cache.svids)
        await rotator.sync_once()  # the next round asks only for what is missing
        await rotator.issuer.close()
        return upstream, after_failure, error, len(rotator.cache.svids)

    upstream, after_failure, error, final = run(main())
    assert isinstance(error, UpstreamUnavailable)
    assert after_failure == count - MAX_BATCH
    assert upstream.batches == [MAX_BATCH, MAX_BATCH, 50, MAX_BATCH]
    assert final == count
