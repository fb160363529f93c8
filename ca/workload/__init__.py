"""The SPIFFE Workload API wire definitions (``workload.proto`` and its generated code).

``workload_pb2`` holds the standard messages; the gRPC method paths are
``/SpiffeWorkloadAPI/<Method>`` (the standard proto has no package). Regenerate with
``scripts/gen-workload-proto.sh``; the generated module uses a private descriptor pool so
it can live in one process with py-spiffe's own copy of the same proto.
"""

from __future__ import annotations

__all__ = ["HEADER_KEY", "HEADER_VALUE", "SERVICE", "method_path"]

SERVICE = "SpiffeWorkloadAPI"
# SPIFFE Workload API §5.1 (workload endpoint): every request carries this metadata so a
# server can refuse requests forwarded by a confused proxy (e.g. SSRF into the socket).
HEADER_KEY = "workload.spiffe.io"
HEADER_VALUE = "true"


def method_path(method: str) -> str:
    return f"/{SERVICE}/{method}"
