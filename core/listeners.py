"""A long-running command checks that its TCP listeners can bind before it starts anything.

gRPC's C core reports a port in use as a log line of its own (``E1208 ... add_port.cc``)
followed by a bare ``RuntimeError``, and aiohttp as ``error while attempting to bind on
address (...)``; a server that then stops what it had started logs that too. Binding each
address once with a plain socket first turns the common case, a port already taken, into
one line that names the flag, before any of that happens. (A port taken between this check
and the real bind still fails there, less tidily: the check narrows the window, it cannot
close it.)
"""

from __future__ import annotations

import contextlib
import socket

from core.errors import CliError

__all__ = ["ensure_bindable"]


def ensure_bindable(flag: str, host: str, port: int) -> None:
    """Raise ``CliError`` naming ``flag`` when ``host:port`` cannot be bound now."""
    if port == 0:
        return  # the kernel picks a free port
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise CliError(f"{flag} {shown}: cannot resolve {host!r}: {exc.strerror}") from exc
    probe = socket.socket(family, kind, proto)
    try:
        # As servers bind: a socket in TIME_WAIT does not count as taken, a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
    except OSError as exc:
        raise CliError(f"{flag} {shown}: cannot listen: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            probe.close()
