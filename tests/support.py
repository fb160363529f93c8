"""Small helpers every process-level test needs: a free loopback port, and waiting for a
condition with a deadline (a failure names what was awaited)."""

from __future__ import annotations

import time
from collections.abc import Callable

from trellis.up.processes import free_ports


def free_port() -> int:
    """A free port below the ephemeral range, so that no outgoing connection of a test
    running beside this one takes it before the process under test binds it."""
    (port,) = free_ports(1)
    return port


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
