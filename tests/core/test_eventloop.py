"""settle_heap: start-up objects leave the collector's generations, young ones wait longer."""

from __future__ import annotations

import asyncio
import gc

import pytest

from core.eventloop import install_uvloop, settle_heap


def test_settle_heap_freezes_what_exists_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    survivor = [object() for _ in range(100)]
    try:
        settle_heap(young_threshold=12_345)
        assert gc.get_freeze_count() >= len(survivor)
        assert gc.get_threshold() == (12_345, 50, 100)
        assert not any(survivor is o for o in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_install_uvloop_sets_its_policy_unless_asked_not_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvloop

    before = asyncio.get_event_loop_policy()
    try:
        monkeypatch.setenv("TRELLIS_NO_UVLOOP", "1")
        install_uvloop()
        assert asyncio.get_event_loop_policy() is before
        monkeypatch.delenv("TRELLIS_NO_UVLOOP")
        install_uvloop()
        assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
    finally:
        asyncio.set_event_loop_policy(before)
