"""A plaintext relay between two sockets, for the paths that carry bytes unchanged:
permissive mode's plaintext callers (`sidecar.permissive`) and outbound passthrough to
destinations outside the mesh (`sidecar.passthrough`).

Each side is a `Pipe`: what one socket receives is written to the other, a FIN is passed
on as a half-close (an app that answers after its caller's FIN still can), both sockets
close once both directions have ended, and a full write buffer pauses reading the other
side (backpressure, no unbounded buffering).
"""

from __future__ import annotations

import asyncio
from typing import cast

__all__ = ["Pipe"]


class Pipe(asyncio.Protocol):
    """One side of a plaintext relay: what arrives here is written to ``peer``; ``partner``
    is the pipe of the other side."""

    def __init__(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        self.partner: Pipe | None = None
        self.transport: asyncio.Transport | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)

    def eof_received(self) -> bool:
        # Half-close travels on: an app that answers after the caller's FIN still can.
        self.eof = True
        if self.peer.can_write_eof() and not self.peer.is_closing():
            self.peer.write_eof()
        if self.partner is not None and self.partner.eof:
            # Both directions ended: nothing keeps the two sockets open any more.
            self.peer.close()
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.close()

    # Backpressure: our transport's buffer is full of what the peer sent, so stop reading
    # the peer until it drains.
    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.is_closing():
            self.peer.resume_reading()
