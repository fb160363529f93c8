"""Garbage-collector settings for long-running Trellis processes.

A server's start-up objects (modules, certificates, protobuf descriptors, configuration)
live as long as the process, yet every full collection walks them all again: tens of
milliseconds on a small machine, spent while requests wait. Once start-up is done they
are frozen out of the collector's sight, and young objects, of which the request paths
make few cycles, are collected less often.
"""

from __future__ import annotations

import gc

__all__ = ["settle_heap"]


def settle_heap(young_threshold: int = 50_000) -> None:
    """Call once, after start-up and before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(young_threshold, 50, 100)
