"""Unix socket addresses as ``SPIFFE_ENDPOINT_SOCKET`` writes them, or as bare paths.

The SPIFFE Workload Endpoint standard (§4, "Locating the Endpoint") names the socket with
a URI, ``unix:///run/spire/agent.sock``; users paste that value into ``--socket`` flags, so
every socket flag takes it as well as a bare path. The standard's ``tcp://`` form is
refused: Trellis attests callers by the kernel's peer credentials (SO_PEERCRED), which
only a Unix socket has.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

__all__ = ["EndpointError", "parse_unix_socket"]


class EndpointError(ValueError):
    """Text that names no Unix socket; the message says why in one line."""


def parse_unix_socket(text: str) -> Path:
    """``unix:///path``, ``unix:/path`` or ``/path`` (or a relative path) → the path."""
    text = text.strip()
    if not text:
        raise EndpointError("empty socket address")
    if ":" not in text.split("/", 1)[0]:
        return Path(text)  # a bare path: nothing before its first "/" looks like a scheme
    parsed = urllib.parse.urlsplit(text)
    scheme = parsed.scheme.lower()
    if scheme == "tcp":
        raise EndpointError(
            f"{text!r}: the Workload API is served on a Unix socket only (callers are attested"
            " by their peer credentials); use unix:///PATH or a path"
        )
    if scheme != "unix":
        raise EndpointError(f"{text!r} is not unix:///PATH or a path")
    # SPIFFE Workload Endpoint §4: no authority, query, fragment or user info; an absolute path.
    if parsed.netloc or parsed.query or parsed.fragment or not parsed.path.startswith("/"):
        raise EndpointError(
            f"{text!r} is not unix:///PATH (a host, query or fragment is not allowed;"
            " the path must be absolute)"
        )
    return Path(urllib.parse.unquote(parsed.path))
