"""Where the data paths hand a connection's record layer to the kernel (`sidecar.ktls`).

Both modes switch a socket an asyncio transport owns. The transport is paused and its
write buffer empty (every handshake record on the wire, RFC 8446 sequence numbers as the
engine counted them); the socket is duplicated, and `ktls.attach` sets the ULP and the
keys on the duplicate, which shares the kernel socket. Pooled sessions keep the
transport for writes (plain `send()` is application data to the kernel) and read
through the duplicate with recvmsg, since a plain `recv()` fails with EIO on a control
record. Direct connections leave asyncio altogether: `splice_relay` moves the payload
between the app socket and the kTLS socket through a pipe in each direction, so it
never enters user space; only control records (close_notify, NewSessionTicket,
KeyUpdate), which `splice(2)` refuses with EINVAL, are read with recvmsg.

When the kernel has no TLS ULP (`ktls.probe`), nothing is switched: the engine's
user-space record layer carries on, `ktls.STATS` counts the fallback by reason
(`trellis_ktls_fallback_total`), and the probe logs it once per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable

from sidecar import ktls
from sidecar.ktls import KtlsClosed, KtlsSocket, KtlsUnavailable

from .channel import EngineChannel

logger = logging.getLogger("sidecar.offload")

__all__ = [
    "kernel_ready",
    "kernel_tls",
    "splice_relay",
    "splice_to_app",
    "splice_to_peer",
    "switch",
]

# The pipe between two sockets: one page-sized chunk at a time would cost a syscall pair
# per 4 KiB; a 1 MiB pipe lets one splice move up to that much.
PIPE_SIZE = 1 << 20
CHUNK = 1 << 20
F_SETPIPE_SZ = 1031  # fcntl.h


def kernel_tls(setting: str) -> bool:
    """Whether connections configured with `ktls: <setting>` go to the kernel (the probe
    runs once per process and logs once when the kernel has no kTLS)."""
    return setting == "auto" and ktls.probe().available


def kernel_ready() -> bool:
    """For a connection that wants kTLS: whether the kernel has it; if not, the
    connection stays in user space and the fallback is counted (`no_kernel_support`)."""
    if ktls.probe().available:
        return True
    ktls.STATS.fallback("no_kernel_support")
    return False


def switch(transport: asyncio.Transport, channel: EngineChannel) -> KtlsSocket | None:
    """Hand the transport's socket to the kernel; None (fallback counted) if it refused.

    The transport must have stopped reading, with nothing left in its write buffer.
    Raises `KtlsUnavailable` when the kernel took the ULP but not the keys: the socket is
    then in neither state and the caller must close the connection."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_write_buffer_size():
        ktls.STATS.fallback("unsent")
        return None
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        switched = ktls.attach(dup, channel.engine)
    except KtlsUnavailable as exc:
        dup.close()
        if exc.reason in ("no_kernel_support", "ulp", "unsent", "suite"):
            logger.debug("staying in user space: %s", exc)
            return None  # the socket is as it was: the engine carries on
        raise
    dup.setblocking(False)
    return switched


def _pipe() -> tuple[int, int]:
    read, write = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(write, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # the default 64 KiB pipe works, in more calls
    return read, write


def splice_to_app(source: KtlsSocket, app: socket.socket) -> None:
    """kTLS socket -> app until close_notify or EOF, then the app's FIN."""
    read, write = _pipe()
    src, dst = source.fileno(), app.fileno()
    try:
        # Application data the engine had opened while completing a record at the switch
        # (`ktls.attach`): `recv` returns it before touching the socket.
        for _ in range(CHUNK):
            if not getattr(source, "_pending", b""):
                break
            app.sendall(source.recv(CHUNK))
        while True:
            try:
                moved = os.splice(src, write, CHUNK)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # A control record (or data the engine handed over): recvmsg reads it.
                data = source.recv(CHUNK)
                if not data:
                    break
                app.sendall(data)
                continue
            if moved == 0:
                break
            while moved:
                moved -= os.splice(read, dst, moved)
        app.shutdown(socket.SHUT_WR)
    finally:
        os.close(read)
        os.close(write)


def splice_to_peer(app: socket.socket, sink: KtlsSocket) -> None:
    """app -> kTLS socket until the app's FIN, then close_notify (RFC 8446 §6.1)."""
    read, write = _pipe()
    src, dst = app.fileno(), sink.fileno()
    try:
        while True:
            moved = os.splice(src, write, CHUNK)
            if moved == 0:
                break
            while moved:
                moved -= os.splice(read, dst, moved)
        sink.close()
    finally:
        os.close(read)
        os.close(write)


def splice_relay(
    link: KtlsSocket,
    app: socket.socket,
    done: Callable[[str | None], None],
) -> None:
    """Relay between `app` and `link` in two threads, each blocked in `splice(2)` (no
    event loop wake-up per chunk, no copy into user space); `done(error)` runs in the
    last thread to finish, after both sockets are closed."""
    link.sock.setblocking(True)
    app.setblocking(True)
    lock = threading.Lock()
    errors: list[str] = []
    remaining = [2]

    def run(pump: Callable[[], None]) -> None:
        try:
            pump()
        except (OSError, KtlsClosed) as exc:
            errors.append(str(exc))
            # One direction failed: the other must not wait for ever.
            for sock in (link.sock, app):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            link.sock.close()
            app.close()
            done(errors[0] if errors else None)

    for pump in (lambda: splice_to_app(link, app), lambda: splice_to_peer(app, link)):
        threading.Thread(target=run, args=(pump,), daemon=True, name="trellis-splice").start()
