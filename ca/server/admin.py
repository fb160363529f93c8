"""The CA server's read-only admin API, on a Unix socket (``ca serve --admin-socket PATH``).

``GET /status`` (trust domain, cluster, the serving intermediate and its expiry, the
bundle's roots and sequence, how many entries and agents), ``GET /entries`` (the
registration entries in force, in the YAML form ``--entries`` reads) and ``GET /agents``
(agents holding an unexpired SVID from this server, and whether they are banned). Nothing
here changes state, and nothing carries key material.

Why a Unix socket, as SPIRE's server API is: the entries say which workloads exist and by
which selectors they are recognised, which is for the CA's operators only, and the CA has
no admin identity to check over TLS (its mTLS listener admits agent SVIDs). Who may ask is
decided by the kernel: the socket is made 0600 right after binding, and every request's
peer is checked with ``SO_PEERCRED`` against the server's own uid (or root), which also
covers the moment between ``bind`` and ``chmod``. ``ca.server.admin_client`` is the
client; ``trellis ca entries list`` / ``agents list`` and ``trellis check`` use it.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography import x509

if TYPE_CHECKING:
    from ca.server.app import CaServer

__all__ = ["admin_app", "bind_admin_socket", "peer_uid"]

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of the request's Unix socket, if known."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    _, uid, _ = _PEERCRED.unpack(raw)
    return int(uid)


def _certificate(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def admin_app(server: CaServer) -> web.Application:
    own_uid = os.getuid()

    @web.middleware
    async def same_user_only(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        uid = peer_uid(request)
        if uid is None or uid not in (0, own_uid):
            return web.json_response(
                {"error": f"only uid {own_uid} or root may use this socket"}, status=403
            )
        return await handler(request)

    async def status(_request: web.Request) -> web.Response:
        bundle = server.bundles.current
        return web.json_response(
            {
                "trust_domain": server.trust_domain.name,
                "cluster": server.config.cluster,
                "intermediate": _certificate(server.intermediate.certificate),
                "bundle": {
                    "sequence": bundle.sequence,
                    "roots": [_certificate(c) for c in bundle.x509_authorities],
                },
                "entries": len(server.entries.current()),
                "agents": len(server.service.attested_agents()),
                "listeners": dict(server.addresses),
            }
        )

    async def entries(_request: web.Request) -> web.Response:
        current = server.entries.current()
        return web.json_response(
            {"revision": current.revision, "entries": [e.to_dict() for e in current]}
        )

    async def agents(_request: web.Request) -> web.Response:
        banned = server.bans.current() if server.bans is not None else frozenset()
        return web.json_response(
            {
                "agents": [
                    {
                        "node": a.node,
                        "spiffe_id": str(a.spiffe_id),
                        "serial": format(a.serial, "x"),
                        "expires_at": a.expires_at.isoformat(),
                        "attestation": a.method,
                        "last_issued_at": a.last_issued_at.isoformat(),
                        "banned": a.node in banned,
                    }
                    for a in server.service.attested_agents()
                ],
                "banned": sorted(banned),
            }
        )

    async def ech(_request: web.Request) -> web.Response:
        # Public halves only (ca.server.stek.EchKey.public): what `trellis ech config`
        # publishes in DNS. Private keys never leave the mTLS stream to agents.
        return web.json_response(
            {
                "services": [
                    {
                        "spiffe_id": str(spiffe_id),
                        "keys": [
                            {
                                "config_id": k.config_id,
                                "public_key": k.public_key.hex(),
                                "public_name": k.public_name,
                                "not_before": k.not_before,
                                "not_after": k.not_after,
                            }
                            for k in keys
                        ],
                    }
                    for spiffe_id, keys in server.steks.leader.public_ech()
                ]
            }
        )

    app = web.Application(middlewares=[same_user_only])
    app.router.add_get("/status", status)
    app.router.add_get("/entries", entries)
    app.router.add_get("/agents", agents)
    app.router.add_get("/ech", ech)
    return app


async def bind_admin_socket(runner: web.AppRunner, path: Path) -> str:
    """Serve ``runner`` on the Unix socket ``path`` (a stale socket file is replaced), 0600."""
    site = web.UnixSite(runner, str(path))
    await site.start()
    path.chmod(0o600)
    return str(path)
