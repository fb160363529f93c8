"""Where the sidecar reaches the app: the pod address the caller dialled, then loopback.

Why: an app that listens on its pod IP alone (``$(POD_IP)`` from the downward API, a common
pattern) is reachable without the mesh, since the kubelet and every caller dial the pod IP;
a sidecar that forwards inbound streams and runs probes against 127.0.0.1 cuts it off
(istio/istio#25177; Istio 1.10 sends both to the pod IP, istio/istio#31121). An app bound
to 0.0.0.0 or ``::`` answers on either; one bound to 127.0.0.1 alone (what a sidecar-only
app may do) is still reached by falling back to the configured loopback host when the pod
address refuses the connection.

The pod address is the local address of the socket the caller's connection arrived on,
never a name the caller chose: a CONNECT authority or a forged original destination could
point anywhere, and the sidecar's own connections leave the redirect (``--uid-owner``), so
dialling such a name would make the sidecar a proxy to elsewhere. The local address is
always one of this pod's own: what the caller dialled for a connection the redirect left
alone (the kubelet's probe of the health port, a peer sidecar's mTLS on 15008), and for a
REDIRECTed one the primary address of the interface it came in on (iptables-extensions(8),
REDIRECT), the pod IP of that family. So it holds for IPv4, IPv6 and dual stack alike: each
connection is answered in its own family.

The sidecar's connection to its own pod IP is not captured again: nat OUTPUT returns the
proxy UID's traffic first (``sidecar.iptables``), and NAT is decided once per connection,
so the packet looping back through ``lo`` never meets the PREROUTING redirect.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

__all__ = ["app_hosts", "dial_app", "local_host"]


def local_host(transport: asyncio.BaseTransport) -> str | None:
    """The address the connection arrived on, IPv4-mapped IPv6 (a dual-stack ``::``
    listener) written as IPv4; None when the transport has no socket address."""
    try:
        sockname = transport.get_extra_info("sockname")
    except OSError:
        return None
    if not isinstance(sockname, tuple) or not sockname or not isinstance(sockname[0], str):
        return None
    host = sockname[0].partition("%")[0]  # a link-local scope is the interface's, not ours
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _loopback_or_unspecified(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return address.is_loopback or address.is_unspecified


def app_hosts(arrived_on: str | None, configured: str) -> tuple[str, ...]:
    """The hosts to try, in order, for an app the configuration places on ``configured``.

    A configured host that is not loopback (an explicit configuration naming another
    address) is used as it is. Otherwise the address the caller's connection arrived on
    comes first and the configured loopback host second; once when they are the same (a
    local mesh on 127.0.0.1).
    """
    if not _loopback_or_unspecified(configured):
        return (configured,)
    if arrived_on is None or arrived_on == configured:
        return (configured,)
    return (arrived_on, configured)


async def dial_app(
    factory: Callable[[], asyncio.Protocol], hosts: tuple[str, ...], port: int
) -> tuple[asyncio.Transport, str]:
    """Connect to the first of ``hosts`` that does not refuse; the transport and the host.

    Only a refusal (nothing listens on that address: RST) moves to the next host; any other
    failure is the app's answer and is raised, as is the last host's refusal. The caller
    bounds the whole by its connect timeout. ``factory`` is called for the winning
    connection only, so one protocol object may be passed in as ``lambda: protocol``.
    """
    loop = asyncio.get_running_loop()
    for index, host in enumerate(hosts):
        try:
            transport, _ = await loop.create_connection(factory, host, port)
        except ConnectionRefusedError:
            if index == len(hosts) - 1:
                raise
            continue
        return transport, host
    raise ConnectionRefusedError(f"no host to dial for port {port}")
