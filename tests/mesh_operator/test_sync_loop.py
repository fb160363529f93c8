"""The operator's sync loop stops when cancelled, even at the instant it is woken.

On Python 3.11 ``asyncio.wait_for`` returns the inner result instead of raising when its
task is cancelled just after the awaited event fired; a ``while True`` loop around it
then never stops, and kopf's shutdown (which cancels every task it did not start with
and waits for each without a bound) hangs with it. The test sets up exactly that order
of events, so it fails on the wait_for version and passes with ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ca.spiffeid import TrustDomain
from mesh_operator.errors import PermanentOperatorError
from mesh_operator.handlers import OperatorConfig, OperatorState, sync_loop

from .conftest import run

TD = TrustDomain("example.org")


class RefusingClient:
    """Every Kubernetes call fails permanently: the loop logs it and waits again."""

    def __getattr__(self, name: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise PermanentOperatorError(f"{name}: refused by the test")

        return refuse


def test_a_sync_loop_cancelled_as_it_is_woken_stops() -> None:
    async def scenario() -> bool:
        config = OperatorConfig(trust_domain=TD, debounce=0.01, resync_interval=60.0)
        state = OperatorState()
        loop_task = asyncio.create_task(sync_loop(config, state, RefusingClient()))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # waiting for a change
        state.dirty.set()
        await asyncio.sleep(0)  # the event's waiter has run; the loop has not seen it yet
        loop_task.cancel()
        await asyncio.wait([loop_task], timeout=10)
        stopped = loop_task.cancelled()
        if not loop_task.done():  # the failure being tested for: clean up anyway
            loop_task.cancel()
        return stopped

    assert run(scenario())
