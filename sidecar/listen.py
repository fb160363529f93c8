"""The IPv6 twin of a transparent-mode listener (see ``sidecar.iptables``)."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable

from .config import Address

logger = logging.getLogger("sidecar")

__all__ = ["listen_if_ipv6"]

# The host has no IPv6 (disabled, or no ::1): nothing can be redirected there either.
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


async def listen_if_ipv6(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    address: Address,
) -> asyncio.Server | None:
    """A server on ``address`` (an IPv6 host), or None with a warning when this host has
    no IPv6. Any other failure (the port taken, ...) raises, as for the IPv4 listener."""
    try:
        return await loop.create_server(
            factory, address.host, address.port, reuse_address=True, backlog=1024
        )
    except OSError as exc:
        if exc.errno not in _NO_IPV6:
            raise
        logger.warning("no IPv6 listener on %s (%s): IPv6 is not captured", address, exc)
        return None
