"""Group commit for the agent's signing calls: coalesce concurrent needs into few batches.

Theory of operation. Callers ``submit`` one item each (an entry ID and a fresh key) and
await its result (the SVID). The batcher keeps at most ``max_in_flight`` calls to ``send``
(``Upstream.batch_new_x509_svids``) running. Whenever a slot is free, everything waiting,
up to ``max_batch`` items, leaves as one call. There is no timer: at low load an item
leaves on the next turn of the event loop, alone (items submitted in the same turn, such
as every entry one sync round finds due, leave together). What arrives while the calls
are in flight waits for the next free slot and then leaves with everything else that
arrived meanwhile. So batches grow exactly as fast as the CA falls behind -- a call that
takes T carries what arrived during the last T -- and a burst never turns into a train of
one-item calls, each paying the CA's fixed per-call cost (about 1 ms of grpc.aio CPU,
more than signing one SVID). Databases call this group commit.

Failures belong to calls: an exception from ``send`` fails exactly the items that call
carried, and the items behind them go out in the next call as usual. A caller cancelled
while its item still waits takes the item out of the queue; once sent, the call goes on
for the others and that caller's result is dropped. The queue is bounded: beyond
``max_pending`` waiting items ``submit`` raises ``BatchQueueFull`` at once, a retryable
``UpstreamUnavailable``, instead of letting a backlog grow without limit while the CA is
slow. ``close()`` fails whatever waits and cancels the calls in flight.

``max_batch`` bounds the agent's side; the CA's own limit (``trellis ca serve
--max-batch``, 1,000 by default, possibly lower) is learnt at run time, and ``GrpcUpstream``
splits a batch above it into several calls. The agent's 100 stays under the CA's
``--max-request-bytes`` (1 MiB by default) even for ML-DSA-65 keys (CSRs of about 5.5 KB).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ca.agent.upstream import UpstreamUnavailable

__all__ = ["BatchQueueFull", "Batcher", "BatcherClosed"]

T = TypeVar("T")
R = TypeVar("R")


class BatchQueueFull(UpstreamUnavailable):
    """More items wait than the batcher may hold; retry later (the CA is behind)."""

    def __init__(self, limit: int) -> None:
        super().__init__("agent-queue-full", f"{limit} signing requests are already waiting")


class BatcherClosed(UpstreamUnavailable):
    """The batcher was closed (the agent is stopping) before this item was signed."""

    def __init__(self) -> None:
        super().__init__("agent-stopping", "the signing queue was closed")


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


class Batcher(Generic[T, R]):
    """Coalesces ``submit(item)`` calls into ``send(items)`` calls (see the module docs).

    ``send`` must return one result per item, in order; a call that returns another
    number of results fails all of its items.
    """

    def __init__(
        self,
        send: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        max_batch: int = 100,
        max_in_flight: int = 1,
        max_pending: int = 10_000,
    ) -> None:
        self._send = send
        self.max_batch = _positive("max_batch", max_batch)
        self.max_in_flight = _positive("max_in_flight", max_in_flight)
        self.max_pending = _positive("max_pending", max_pending)
        self._pending: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._calls: set[asyncio.Task[None]] = set()
        self._dispatch_scheduled = False
        self._closed = False
        # Counters for benchmarks and the curious: calls made, items they carried.
        self.calls_sent = 0
        self.items_sent = 0

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    async def submit(self, item: T) -> R:
        """The result for ``item``, or the exception its call failed with."""
        if self._closed:
            raise BatcherClosed()
        if len(self._pending) >= self.max_pending:
            raise BatchQueueFull(self.max_pending)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._schedule()
        try:
            return await future
        except asyncio.CancelledError:
            self._forget(future)
            raise

    async def close(self) -> None:
        """Fail every waiting item with ``BatcherClosed`` and cancel the calls in flight."""
        self._closed = True
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(BatcherClosed())
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    # -- internals ------------------------------------------------------------------------

    def _forget(self, future: asyncio.Future[R]) -> None:
        # A cancelled caller whose item has not left yet: take it out of the queue.
        for index, (_, waiting) in enumerate(self._pending):
            if waiting is future:
                del self._pending[index]
                return

    def _schedule(self) -> None:
        # call_soon rather than dispatching now, so that items submitted in the same turn
        # of the event loop leave in one call.
        if self._dispatch_scheduled or self._closed or len(self._calls) >= self.max_in_flight:
            return
        self._dispatch_scheduled = True
        asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        while len(self._calls) < self.max_in_flight and self._pending:
            batch: list[tuple[T, asyncio.Future[R]]] = []
            while self._pending and len(batch) < self.max_batch:
                item, future = self._pending.popleft()
                if not future.done():  # a caller cancelled in this same turn
                    batch.append((item, future))
            if not batch:
                break
            task = loop.create_task(self._call(batch))
            self._calls.add(task)
            task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        if self._pending:
            self._schedule()

    async def _call(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.calls_sent += 1
        self.items_sent += len(batch)
        try:
            results = await self._send([item for item, _ in batch])
            if len(results) != len(batch):
                raise UpstreamUnavailable(
                    "short-batch", f"the CA answered {len(results)} of {len(batch)} requests"
                )
        except asyncio.CancelledError:
            for _, future in batch:
                if not future.done():
                    future.set_exception(BatcherClosed())
            raise
        except Exception as exc:  # handed to exactly the callers this call carried
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
