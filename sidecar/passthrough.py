"""Outbound passthrough: a destination outside the mesh, dialled as the app meant it.

A transparent sidecar captures every outbound TCP connection of its pod, but only a
destination with a sidecar of its own can answer a CONNECT on the inbound port. When the
operator publishes the mesh's destinations (``meshapi.registry``), a connection to any
other address is either spliced, byte for byte, to its original destination
(``ALLOW_ANY``, Istio's default and ours) or reset (``REGISTRY_ONLY``); both are counted
in ``trellis_sidecar_passthrough_total{outcome}``.

The sidecar's own dial is not redirected again: the iptables plan exempts the proxy's UID
(``sidecar.iptables``), which is what keeps this from looping back to port 15001.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from meshapi.registry import OutboundTrafficPolicy

from .config import Address
from .metrics import Metrics
from .relay import Pipe

logger = logging.getLogger("sidecar.passthrough")

__all__ = ["PassthroughRoute", "reset", "take_over"]

# SO_LINGER {on, 0}: close() sends RST, so the app sees "connection refused/reset" at
# once rather than an empty reply it might mistake for an answer.
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class PassthroughRoute:
    """A destination the mesh registry does not list, and the switch that decides it."""

    destination: Address
    policy: OutboundTrafficPolicy


def reset(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


def take_over(
    client: asyncio.Transport,
    route: PassthroughRoute,
    metrics: Metrics,
    connect_timeout: float,
    tasks: set[asyncio.Task[None]],
    handoff: Callable[[], tuple[list[bytes], bool]],
) -> None:
    """Handle an app connection whose destination is outside the mesh; ``handoff`` gives
    what its protocol read from the app until the splice takes the transport over."""
    if route.policy == "REGISTRY_ONLY":
        metrics.passthrough.labels(outcome="refused").inc()
        logger.info("refused %s: outside the mesh (REGISTRY_ONLY)", route.destination)
        reset(client)
        return
    task = asyncio.get_running_loop().create_task(
        _forward(client, route.destination, metrics, connect_timeout, handoff)
    )
    tasks.add(task)  # the loop holds tasks weakly
    task.add_done_callback(tasks.discard)


async def _forward(
    client: asyncio.Transport,
    destination: Address,
    metrics: Metrics,
    connect_timeout: float,
    handoff: Callable[[], tuple[list[bytes], bool]],
) -> None:
    loop = asyncio.get_running_loop()
    remote_side = Pipe(client)
    try:
        remote, _ = await asyncio.wait_for(
            loop.create_connection(lambda: remote_side, destination.host, destination.port),
            connect_timeout,
        )
    except (OSError, TimeoutError) as exc:
        metrics.passthrough.labels(outcome="unreachable").inc()
        logger.info("passthrough to %s failed: %s", destination, exc)
        reset(client)
        return
    if client.is_closing():
        remote.close()
        return
    metrics.passthrough.labels(outcome="forwarded").inc()
    client_side = Pipe(remote)
    client_side.partner, remote_side.partner = remote_side, client_side
    held, eof = handoff()
    for data in held:
        remote.write(data)
    client.set_protocol(client_side)
    client_side.connection_made(client)
    if eof:
        client_side.eof_received()  # passes the app's FIN on
    else:
        client.resume_reading()
