"""The pod annotations that shape its redirect, read once: the injector turns them into the
flags of ``trellis sidecar iptables`` (``sidecar.iptables``) for its init container, and
the CNI plugin (``sidecar.cni``) reads the same annotations from the stored pod.

* ``trellis.dev/exclude-outbound-ip-ranges``: CIDRs whose traffic never reaches the
  sidecar (a managed database, the cloud's metadata service), as Istio's
  ``traffic.sidecar.istio.io/excludeOutboundIPRanges``.
* ``trellis.dev/include-outbound-ip-ranges``: redirect only these CIDRs (``*``, the
  default, is every address), as Istio's ``includeOutboundIPRanges``.
* ``trellis.dev/exclude-inbound-ports``: inbound ports left to the app, unredirected.
* ``trellis.dev/exclude-outbound-ports``: outbound destination ports left alone.

Each is validated at admission: a malformed one refuses the pod with one line naming the
annotation, since an init container handed it would fail in a crash loop instead, and the
pod would never start. Ranges are rendered canonically (``10.0.0.0/8``), ports as numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import FieldError
from meshapi.registry import Network, parse_ip_ranges

__all__ = [
    "ANNOTATION_EXCLUDE_INBOUND_PORTS",
    "ANNOTATION_EXCLUDE_OUTBOUND_IP_RANGES",
    "ANNOTATION_EXCLUDE_OUTBOUND_PORTS",
    "ANNOTATION_INCLUDE_OUTBOUND_IP_RANGES",
    "AnnotationError",
    "RedirectAnnotations",
    "parse_redirect_annotations",
]

ANNOTATION_EXCLUDE_OUTBOUND_PORTS = "trellis.dev/exclude-outbound-ports"
ANNOTATION_EXCLUDE_INBOUND_PORTS = "trellis.dev/exclude-inbound-ports"
ANNOTATION_EXCLUDE_OUTBOUND_IP_RANGES = "trellis.dev/exclude-outbound-ip-ranges"
ANNOTATION_INCLUDE_OUTBOUND_IP_RANGES = "trellis.dev/include-outbound-ip-ranges"


class AnnotationError(FieldError):
    """A ``trellis.dev/*`` annotation is malformed; the pod is refused with this message."""


@dataclass(frozen=True, slots=True)
class RedirectAnnotations:
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ranges: tuple[Network, ...] = ()
    include_outbound_ranges: tuple[Network, ...] | None = None  # None: every address

    def iptables_args(self) -> list[str]:
        """The flags beyond the injector's own (its health port is excluded separately)."""
        args: list[str] = []
        if self.exclude_outbound_ports:
            ports = ",".join(str(p) for p in self.exclude_outbound_ports)
            args.append(f"--exclude-outbound-ports={ports}")
        if self.exclude_outbound_ranges:
            ranges = ",".join(str(n) for n in self.exclude_outbound_ranges)
            args.append(f"--exclude-outbound-ip-ranges={ranges}")
        if self.include_outbound_ranges is not None:
            ranges = ",".join(str(n) for n in self.include_outbound_ranges)
            args.append(f"--include-outbound-ip-ranges={ranges}")
        return args


def _ports(annotations: Mapping[str, Any], key: str) -> tuple[int, ...]:
    text = str(annotations.get(key, ""))
    ports: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise AnnotationError(key, f"{item!r} is not a port number (1-65535)")
        ports.append(int(item))
    return tuple(dict.fromkeys(ports))


def _ranges(annotations: Mapping[str, Any], key: str) -> tuple[Network, ...] | None:
    if key not in annotations:
        return None
    try:
        return parse_ip_ranges(str(annotations[key]), key)
    except FieldError as exc:
        # parse_networks names the list item (key[1]); the annotation is what the user wrote.
        raise AnnotationError(key, exc.reason) from exc


def parse_redirect_annotations(annotations: Mapping[str, Any]) -> RedirectAnnotations:
    """Raises ``AnnotationError`` naming the annotation and the value it refuses."""
    excluded = _ranges(annotations, ANNOTATION_EXCLUDE_OUTBOUND_IP_RANGES)
    if excluded is None and ANNOTATION_EXCLUDE_OUTBOUND_IP_RANGES in annotations:
        raise AnnotationError(
            ANNOTATION_EXCLUDE_OUTBOUND_IP_RANGES,
            "* would exclude every address; opt out with trellis.dev/inject: false instead",
        )
    return RedirectAnnotations(
        exclude_outbound_ports=_ports(annotations, ANNOTATION_EXCLUDE_OUTBOUND_PORTS),
        exclude_inbound_ports=_ports(annotations, ANNOTATION_EXCLUDE_INBOUND_PORTS),
        exclude_outbound_ranges=excluded or (),
        include_outbound_ranges=_ranges(annotations, ANNOTATION_INCLUDE_OUTBOUND_IP_RANGES),
    )
