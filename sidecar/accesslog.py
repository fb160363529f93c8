"""The sidecar's access log: one line per CONNECT stream, on the ``sidecar.access`` logger.

Each line's event is a short sentence (``denied spiffe://example.org/ns/a/sa/b -> port
8080``, ``ok -> echo.default:8080 (spiffe://...)``) for whoever reads it plainly, with these
fields (``core.logs`` renders them as JSON or ``key=value`` text):

``direction``  ``inbound`` (a peer's stream to our app) or ``outbound`` (our app's
               connection to a peer)
``peer``       the other sidecar's SPIFFE ID (inbound: the caller; outbound: the server)
``port``       inbound: the app port the caller asked for
``authority``  outbound: the CONNECT ``:authority`` (the upstream's target)
``status``     the CONNECT's HTTP status, when there was one (200, 403, 404, 503, ...)
``outcome``    ``ok``, ``reset``, ``error``, ``refused`` (404 and the like) or ``denied``
               (a policy refusal, 403)
``rule``       what the policy decided by (``sidecar.policy.Decision.rule``)
``reason``     why a stream was refused, in words
``bytes_sent`` / ``bytes_received``  bytes sent to and received from the peer on the
               stream (read from and written to this side's app)
``duration_ms`` from the stream's start to its end

Allowed streams log at INFO; a denial logs at WARNING, so it shows under the default
``--log-level warning`` even with ``--access-log off`` (which only sets this logger back to
following ``--log-level``).
"""

from __future__ import annotations

import logging
import time

from ca.spiffeid import SpiffeId

__all__ = ["ACCESS_LOGGER", "log_stream"]

ACCESS_LOGGER = "sidecar.access"
_log = logging.getLogger(ACCESS_LOGGER)


def log_stream(
    direction: str,
    outcome: str,
    *,
    started: float,
    peer: SpiffeId | None,
    port: int | None = None,
    authority: str | None = None,
    status: int | None = None,
    rule: str | None = None,
    reason: str | None = None,
    bytes_sent: int = 0,
    bytes_received: int = 0,
) -> None:
    """One access line; ``started`` is the stream's ``time.monotonic()`` at its start."""
    level = logging.WARNING if outcome == "denied" else logging.INFO
    if not _log.isEnabledFor(level):
        return
    fields = {
        "direction": direction,
        "peer": None if peer is None else str(peer),
        "port": port,
        "authority": authority,
        "status": status,
        "outcome": outcome,
        "rule": rule,
        "reason": reason,
        "bytes_sent": bytes_sent,
        "bytes_received": bytes_received,
        "duration_ms": round((time.monotonic() - started) * 1000, 1),
    }
    where = f"{peer} -> port {port}" if direction == "inbound" else f"-> {authority} ({peer})"
    _log.log(level, "%s %s", outcome, where, extra={"fields": fields})
