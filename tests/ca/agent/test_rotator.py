"""The rotator's sync loop: which wake-ups re-read the node's entries from the CA.

Waits are bounded by deadlines on events (a rotation, a new entry), never measured.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ca.agent.rotator import Rotator
from tests.ca.agent.conftest import LiveCa, entry, make_upstream, run, running_agent


async def _rotations(rotator: Rotator, count: int) -> None:
    serials: set[int] = set()
    while True:
        version = rotator.cache.version
        serials.update(c.chain[0].serial_number for c in rotator.cache.svids.values())
        if len(serials) > count:
            return
        await asyncio.wait_for(rotator.wait_for_change(version), 10)


def test_a_wake_up_for_a_rotation_alone_does_not_refetch_the_entries(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> dict[str, int]:
        upstream = make_upstream(live_ca, [entry(ttl=2)])  # rotates about every second
        async with running_agent(upstream, short_dir, sync_interval=60) as agent:
            await _rotations(agent.rotator, 2)
        return upstream.calls

    calls = run(main())
    assert calls["batch_new_x509_svids"] >= 3
    assert calls["fetch_entries"] == 1


def test_a_poke_refetches_the_entries_between_sync_intervals(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> tuple[int, bool]:
        upstream = make_upstream(live_ca, [entry()])
        added = entry("spiffe://example.org/ns/default/sa/db", entry_id="db")
        async with running_agent(upstream, short_dir, sync_interval=60) as agent:
            upstream.set_entries([entry(), added])
            agent.rotator.poke()
            while "db" not in agent.rotator.cache.svids:
                await asyncio.wait_for(
                    agent.rotator.wait_for_change(agent.rotator.cache.version), 10
                )
            return upstream.calls["fetch_entries"], "db" in agent.rotator.cache.entries

    fetches, known = run(main())
    assert fetches == 2 and known


def test_a_sync_loop_cancelled_as_it_is_woken_stops() -> None:
    """On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that arrives just after
    the awaited event fired; the loop's sleep would then return, and the loop go on for
    ever (the agent's stop would hang). This sets up exactly that order of events."""
    from typing import Any

    from ca.agent.rotator import RotatorConfig
    from ca.agent.upstream import UpstreamUnavailable

    class DownUpstream:
        agent_svid = None  # never attested

        def __getattr__(self, name: str) -> Any:  # every call: the CA is unreachable
            async def down(*args: Any, **kwargs: Any) -> Any:
                raise UpstreamUnavailable("down", "the test's CA is down")

            return down

    async def main() -> bool:
        config = RotatorConfig(sync_interval=60, backoff_base=30, backoff_cap=60, jitter=0)
        rotator = Rotator(DownUpstream(), config=config)  # type: ignore[arg-type]
        loop_task = asyncio.create_task(rotator.sync_loop())
        await asyncio.sleep(0.1)  # the first sync failed; it backs off for 30 s
        rotator.poke()
        await asyncio.sleep(0)  # the wake-up's waiter has run; the loop has not seen it yet
        loop_task.cancel()
        await asyncio.wait([loop_task], timeout=10)
        stopped = loop_task.cancelled()
        loop_task.cancel()  # were it still running
        return stopped

    assert run(main())
