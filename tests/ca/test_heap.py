"""settle_heap: start-up objects leave the collector's generations, young ones wait longer."""

from __future__ import annotations

import gc

from ca.heap import settle_heap


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
