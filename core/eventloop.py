"""Process-wide settings for long-running Trellis processes: event loop and collector.

uvloop runs the event loop in C (libuv): fewer interpreter cycles per wake-up for every
socket the process serves, grpc.aio's included. ``TRELLIS_NO_UVLOOP=1`` keeps asyncio's
own loop, e.g. to rule uvloop out when chasing a bug.

A server's start-up objects (modules, certificates, protobuf descriptors, configuration)
live as long as the process, yet every full collection walks them all again: tens of
milliseconds on a small machine, spent while requests wait. Once start-up is done they
are frozen out of the collector's sight, and young objects, of which the request paths
make few cycles, are collected less often.
"""

from __future__ import annotations

import asyncio
import gc
import os

__all__ = ["install_uvloop", "settle_heap"]


def install_uvloop() -> None:
    """Call before ``asyncio.run``; without uvloop installed, asyncio's loop stays."""
    if os.environ.get("TRELLIS_NO_UVLOOP"):
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def settle_heap(young_threshold: int = 50_000) -> None:
    """Call once, after start-up and before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(young_threshold, 50, 100)
