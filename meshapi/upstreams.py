"""The explicit-upstreams list: the ``trellis.dev/upstreams`` annotation and ``--upstreams``.

A pod's author writes ``trellis.dev/upstreams: "api.default:8080=9001,db.shop:5432=9002"``;
the injector (``mesh_operator.injection``) checks it, refusing the pod if it is malformed,
and passes it on in canonical form as the sidecar's ``--upstreams`` flag, which the sidecar
(``sidecar.config``) reads with the same parser. Each entry ``SERVICE:PORT=LOCAL_PORT`` means:
the app dials ``127.0.0.1:LOCAL_PORT``, and the sidecar carries the connection to
``SERVICE``'s sidecar as a CONNECT stream for ``SERVICE:PORT``.

Grammar: entries separated by commas, blanks around an entry ignored, at least one entry.
``SERVICE`` is a lowercase DNS name (RFC 1123 §2.1 labels: letters, digits and hyphens, at
most 63 characters each, 253 in all; a dotted IPv4 address is one too) or an IPv6 address
in brackets (RFC 3986 §3.2.2); ``PORT`` and ``LOCAL_PORT`` are 1-65535; no local port twice
(one listener each). ``render_upstreams`` writes the canonical form: ``, `` becomes ``,``
and leading zeros go.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple

from core.errors import FieldError

__all__ = ["Upstream", "parse_upstreams", "render_upstreams"]

# At most five digits: int() of a longer run is never a port, and of a huge one raises.
_ENTRY = re.compile(r"(?P<service>.+):(?P<port>[0-9]{1,5})=(?P<local>[0-9]{1,5})")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_MAX_DNS_NAME = 253
_SHAPE = "SERVICE:PORT=LOCAL_PORT (e.g. api.default:8080=9001)"
_QUOTED = 80  # characters of a bad entry an error quotes: it ends on one line, however long


class Upstream(NamedTuple):
    """One entry; a tuple, so ``("api.default", 8080, 9001)`` compares equal to it."""

    service: str  # a DNS name, or an IPv6 address without its brackets
    port: int
    local_port: int

    def __str__(self) -> str:
        host = f"[{self.service}]" if ":" in self.service else self.service
        return f"{host}:{self.port}={self.local_port}"


def _service(text: str) -> str | None:
    """The service host, or None if it is neither a DNS name nor a bracketed IPv6 address."""
    if text.startswith("[") and text.endswith("]"):
        try:
            ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            return None
        return text[1:-1]
    if len(text) > _MAX_DNS_NAME:
        return None
    if all(_DNS_LABEL.fullmatch(label) for label in text.split(".")):
        return text
    return None


def _quote(text: str) -> str:
    return repr(text if len(text) <= _QUOTED else text[:_QUOTED] + "...")


def _port(text: str) -> int | None:
    value = int(text)
    return value if 1 <= value <= 65535 else None


def parse_upstreams(text: str, where: str) -> tuple[Upstream, ...]:
    """``svc.ns:8080=9001,...`` into entries; ``FieldError`` at ``where[i]`` (the i-th
    comma-separated part) or at ``where`` for the list as a whole."""
    result: list[Upstream] = []
    owners: dict[int, str] = {}
    for index, part in enumerate(text.split(",")):
        item = part.strip()
        if not item:
            continue
        at = f"{where}[{index}]"
        match = _ENTRY.fullmatch(item)
        if match is None:
            raise FieldError(at, f"{_quote(item)} must look like {_SHAPE}")
        service = _service(match["service"])
        if service is None:
            raise FieldError(
                at,
                f"{_quote(match['service'])} in {_quote(item)} is not a lowercase DNS name or a "
                "bracketed IPv6 address",
            )
        port, local = _port(match["port"]), _port(match["local"])
        if port is None or local is None:
            raise FieldError(at, f"{_quote(item)}: ports must be 1-65535")
        if local in owners:
            raise FieldError(
                at, f"local port {local} is used twice ({_quote(owners[local])} has it already)"
            )
        owners[local] = item
        result.append(Upstream(service, port, local))
    if not result:
        raise FieldError(where, f"empty: name at least one {_SHAPE}, or leave it out")
    return tuple(result)


def render_upstreams(upstreams: Iterable[Upstream]) -> str:
    """The canonical text, which ``parse_upstreams`` reads back as the same entries."""
    return ",".join(str(u) for u in upstreams)
