"""`trellis sidecar iptables`: the redirect that makes transparent mode transparent.

`plan()` is pure: it returns the iptables argument lists (nat table, own chains so a rerun
replaces rather than duplicates). Outbound TCP from any UID but the proxy's is redirected
to the outbound port (loopback destinations included, the sidecar's own connections
excluded by `--uid-owner`); inbound TCP to any port but the excluded ones (the admin port)
and the sidecar's own inbound port is redirected to the inbound port.

Inbound capture in a pod means mTLS-only access: plaintext from outside the mesh would
land on the TLS port and fail the handshake, which is the point.

The proxy UID's RETURN comes first in the OUTPUT chain and names no destination: the
sidecar dials the app at the pod IP (``sidecar.appaddress``), and that connection must not
be redirected into the sidecar's own outbound port. PREROUTING never sees it: NAT is
decided once per connection, in OUTPUT for one made on this host.

Without IP ranges the plan names no address, so the same rules serve iptables and
ip6tables; in transparent mode the sidecar listens on the IPv6 twin of its loopback and
wildcard addresses too (``::1``, ``::``), where ip6tables' REDIRECT delivers. IP ranges
(Istio's ``excludeOutboundIPRanges`` / ``includeOutboundIPRanges``) are per family: each
tool's plan holds only its own family's ranges. An excluded range returns before any
redirect, so its traffic never reaches the sidecar; an include list replaces the
catch-all redirect by one per range, so a family with no included range is not
redirected at all.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from typing import Literal

from meshapi.registry import Network

__all__ = ["apply", "plan"]

OUT_CHAIN = "TRELLIS_OUTPUT"
IN_CHAIN = "TRELLIS_INBOUND"


def plan(
    *,
    proxy_uid: int,
    outbound_port: int,
    inbound_port: int,
    exclude_inbound_ports: Sequence[int] = (),
    exclude_outbound_ports: Sequence[int] = (),
    capture_inbound: bool = True,
    exclude_outbound_ranges: Sequence[Network] = (),
    include_outbound_ranges: Sequence[Network] | None = None,
    family: Literal[4, 6] = 4,
) -> list[list[str]]:
    """The rules for one tool (``family`` 4: iptables, 6: ip6tables); ranges of the other
    family are left out, since iptables refuses an IPv6 ``-d`` and ip6tables an IPv4 one.
    ``include_outbound_ranges`` None redirects every destination (``*``)."""
    rules: list[list[str]] = []
    for chain in (OUT_CHAIN, IN_CHAIN):
        rules.append(["-t", "nat", "-N", chain])
        rules.append(["-t", "nat", "-F", chain])
    # Hook our chains in (deleted first so a rerun leaves exactly one jump).
    rules.append(["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUT_CHAIN])
    if capture_inbound:
        rules.append(["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", IN_CHAIN])
    out = ["-t", "nat", "-A", OUT_CHAIN]
    rules.append([*out, "-m", "owner", "--uid-owner", str(proxy_uid), "-j", "RETURN"])
    for port in exclude_outbound_ports:
        rules.append([*out, "-p", "tcp", "--dport", str(port), "-j", "RETURN"])
    for network in exclude_outbound_ranges:
        if network.version == family:
            rules.append([*out, "-d", str(network), "-j", "RETURN"])
    redirect = ["-j", "REDIRECT", "--to-ports", str(outbound_port)]
    if include_outbound_ranges is None:
        rules.append([*out, "-p", "tcp", *redirect])
    else:
        for network in include_outbound_ranges:
            if network.version == family:
                rules.append([*out, "-p", "tcp", "-d", str(network), *redirect])
    inn = ["-t", "nat", "-A", IN_CHAIN]
    for port in (inbound_port, *exclude_inbound_ports):
        rules.append([*inn, "-p", "tcp", "--dport", str(port), "-j", "RETURN"])
    rules.append([*inn, "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(inbound_port)])
    return rules


def _unhook(binary: str) -> None:
    for hook, chain in (("OUTPUT", OUT_CHAIN), ("PREROUTING", IN_CHAIN)):
        while (
            subprocess.run(
                [binary, "-t", "nat", "-D", hook, "-p", "tcp", "-j", chain],
                capture_output=True,
                check=False,
            ).returncode
            == 0
        ):
            pass


def apply(rules: Sequence[Sequence[str]], binary: str = "iptables") -> None:
    """Run the plan; raises RuntimeError with iptables' own words on failure."""
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} not found (install the iptables package)")
    _unhook(path)
    for rule in rules:
        result = subprocess.run([path, *rule], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            if "-N" in rule and "exists" in result.stderr:
                continue
            raise RuntimeError(f"{binary} {' '.join(rule)}: {result.stderr.strip()}")
