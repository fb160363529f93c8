"""The IPv6 twin of a transparent-mode listener (see ``sidecar.iptables``)."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable

from .config import Address

logger = logging.getLogger("sidecar")

__all__ = ["ipv6_twin", "listen_if_ipv6", "listen_twin"]

# The host has no IPv6 (disabled, or no ::1): nothing can be redirected there either.
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


def ipv6_twin(address: Address) -> Address | None:
    """Where ip6tables' REDIRECT delivers what iptables' delivers to ``address``: ``::1``
    for IPv4 loopback, ``::`` for the IPv4 wildcard, same port; None for other hosts."""
    twin = {"127.0.0.1": "::1", "0.0.0.0": "::"}.get(address.host)
    return Address(twin, address.port) if twin else None


async def listen_twin(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    address: Address,
) -> asyncio.Server | None:
    """A transparent-mode listener's second server, on the IPv6 twin of ``address``; None
    when it has none or the host has no IPv6."""
    twin = ipv6_twin(address)
    return None if twin is None else await listen_if_ipv6(loop, factory, twin)


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
