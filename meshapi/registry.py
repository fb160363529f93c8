"""The ``mesh`` section of the ``SidecarPolicy`` document: which destinations are in the mesh.

A transparent sidecar sees every outbound TCP connection of its pod (``SO_ORIGINAL_DST``).
Only a destination with a sidecar of its own can answer an mTLS CONNECT on the inbound
port; anything else (the API server, a managed database, the internet) has to be dialled
as the app meant it. The operator publishes what it knows is in the mesh -- the ClusterIPs
of Services that select injected pods, and the pod IPs of injected pods -- as networks::

    "mesh": {"outboundTrafficPolicy": "ALLOW_ANY",
             "destinations": ["10.96.0.10/32", "10.244.1.7/32"]}

``outboundTrafficPolicy`` is the switch users know from Istio's ``MeshConfig``:
``ALLOW_ANY`` (the default) forwards a destination outside the mesh unchanged
(passthrough); ``REGISTRY_ONLY`` refuses it. ``destinations`` defaults to none; the
canonical form lists each network once, in ``ipaddress``'s order (IPv4 first).

A document without a ``mesh`` section predates it: the sidecar then treats every
destination as in the mesh, as it always has.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from core.errors import FieldError

__all__ = [
    "OUTBOUND_TRAFFIC_POLICIES",
    "MeshRegistry",
    "Network",
    "OutboundTrafficPolicy",
    "parse_ip_ranges",
    "parse_mesh_registry",
    "parse_networks",
    "render_mesh_registry",
]

OutboundTrafficPolicy = Literal["ALLOW_ANY", "REGISTRY_ONLY"]
OUTBOUND_TRAFFIC_POLICIES: tuple[OutboundTrafficPolicy, ...] = ("ALLOW_ANY", "REGISTRY_ONLY")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _sort_key(network: Network) -> tuple[int, int, int]:
    return network.version, int(network.network_address), network.prefixlen


@dataclass(frozen=True, slots=True)
class MeshRegistry:
    """What is in the mesh, and what happens to a destination that is not."""

    destinations: tuple[Network, ...] = ()
    outbound_traffic_policy: OutboundTrafficPolicy = "ALLOW_ANY"

    def __post_init__(self) -> None:
        # Canonical on construction, so two registries listing the same networks are equal.
        canonical = tuple(sorted(set(self.destinations), key=_sort_key))
        object.__setattr__(self, "destinations", canonical)

    def contains(self, host: str) -> bool:
        """Whether an address (as ``SO_ORIGINAL_DST`` gives it) is a mesh destination."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:a.b.c.d from a dual-stack socket
        return any(address in network for network in self.destinations)


def parse_networks(raw: Any, where: str) -> tuple[Network, ...]:
    """A list of CIDRs (``10.0.0.0/8``, ``fd00::/8``; a bare address is a /32 or /128).
    Host bits must be zero: ``10.0.0.1/8`` is refused, since it names no one network."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise FieldError(where, "expected a list of CIDRs")
    networks: list[Network] = []
    for index, item in enumerate(raw):
        if not isinstance(item, str):
            raise FieldError(f"{where}[{index}]", f"expected a CIDR string, got {item!r}")
        try:
            networks.append(ipaddress.ip_network(item.strip()))
        except ValueError as exc:
            raise FieldError(f"{where}[{index}]", f"{item!r} is not a CIDR: {exc}") from exc
    return tuple(networks)


def parse_ip_ranges(text: str, where: str) -> tuple[Network, ...] | None:
    """A comma-separated list of CIDRs, as the pod annotations
    ``trellis.dev/exclude-outbound-ip-ranges`` / ``include-outbound-ip-ranges`` and the
    matching ``trellis sidecar iptables`` flags give it; ``*`` alone means every address
    (None). Empty text is no range at all."""
    if text.strip() == "*":
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if "*" in items:
        raise FieldError(where, "* means every address and cannot be combined with ranges")
    return parse_networks(items, where)


def parse_mesh_registry(raw: Any, where: str = "mesh") -> MeshRegistry:
    if not isinstance(raw, Mapping):
        raise FieldError(where, "expected an object with outboundTrafficPolicy and destinations")
    policy = raw.get("outboundTrafficPolicy", "ALLOW_ANY")
    if policy not in OUTBOUND_TRAFFIC_POLICIES:
        raise FieldError(
            f"{where}.outboundTrafficPolicy", f"{policy!r} must be ALLOW_ANY or REGISTRY_ONLY"
        )
    return MeshRegistry(
        destinations=parse_networks(raw.get("destinations"), f"{where}.destinations"),
        outbound_traffic_policy=policy,
    )


def render_mesh_registry(registry: MeshRegistry) -> dict[str, Any]:
    return {
        "outboundTrafficPolicy": registry.outbound_traffic_policy,
        "destinations": [str(network) for network in registry.destinations],
    }
