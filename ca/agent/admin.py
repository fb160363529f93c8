"""The agent's admin HTTP endpoint (aiohttp): ``/healthz``, ``/readyz``, ``/livez``,
``/metrics``, ``/config``.

``/healthz`` is 200 while the agent can serve valid SVIDs, including when the CA is
unreachable but the cache still holds unexpired SVIDs for every entry (``"status":
"degraded"``): restarting an agent does not bring a CA back, so a liveness probe must not
kill it for that. It is 503 ``"starting"`` until the first sync with the CA has completed
(no entry is known yet, so there is nothing to serve: Workload API calls wait for the sync,
then get UNAVAILABLE), and 503 ``"unhealthy"`` when the agent's own SVID has expired or
entries lack SVIDs while the CA is unreachable. ``/readyz`` is 200 once the first sync with
the CA has completed, like ``"synced"`` in ``/healthz``. ``/livez`` is for a liveness
probe: 503 only when a restart is the cure (the agent's own SVID has expired, which only a
new attestation fixes), not for an unreachable CA or entries still without SVIDs, where a
restart would only throw the cache away.

``/config`` mirrors the sidecar's: the agent's own identity, its upstream and how it
attests, the Workload API socket, the trust bundles, and the cached SVIDs by entry (ID,
selectors, serial, expiry, rotation time). Never a key: a private key is the one thing the
agent holds that a reader of an admin port must not get, so ``describe_cache`` builds its
output field by field from certificates and entries, never from ``CachedSvid`` wholesale.
``/config`` answers loopback callers only: in a cluster the admin port listens on every
address for the kubelet's probes and Prometheus, but the entries and selectors say which
workloads run on the node, which the sidecar keeps to its loopback-only admin listener
too. Read it on the node, or through ``kubectl port-forward``, which connects from the
pod's own loopback.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ca.agent.cache import SvidCache
from ca.agent.grpc_upstream import GrpcUpstream
from ca.agent.rotator import Rotator
from ca.agent.upstream import InProcessUpstream, Upstream
from ca.bundle import TrustBundle

__all__ = ["AdminServer", "describe_cache", "describe_upstream"]


def _moment(when: dt.datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def _certificate(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def _bundle(bundle: TrustBundle) -> dict[str, Any]:
    return {
        "trust_domain": bundle.trust_domain.name,
        "sequence": bundle.sequence,
        "x509_authorities": [_certificate(c) for c in bundle.x509_authorities],
    }


def describe_upstream(upstream: Upstream) -> dict[str, Any]:
    """Where the agent gets its SVIDs, and how it attests when it has no valid SVID."""
    if isinstance(upstream, GrpcUpstream):
        return {
            "kind": "grpc",
            "address": upstream.client.address,
            "attest_address": upstream.client.attest_address,
            "attestation": upstream.attestation_method,
            "reconnects": upstream.reconnects,
        }
    if isinstance(upstream, InProcessUpstream):
        # --local-ca: the agent signs with the intermediate itself (development only).
        return {"kind": "in-process", "attestation": "none (local CA)"}
    return {"kind": type(upstream).__name__}


def describe_cache(cache: SvidCache) -> dict[str, Any]:
    """Entries and their SVIDs, without keys (see the module docstring)."""
    entries = []
    for entry_id, entry in sorted(cache.entries.items()):
        cached = cache.svids.get(entry_id)
        entries.append(
            {
                "id": entry_id,
                "spiffe_id": str(entry.spiffe_id),
                "selectors": sorted(str(s) for s in entry.selectors),
                "hint": entry.hint or None,
                "svid": None
                if cached is None
                else {
                    "serial": format(cached.chain[0].serial_number, "x"),
                    "issued_at": cached.issued_at.isoformat(),
                    "rotate_at": cached.rotate_at.isoformat(),
                    "not_after": cached.expires_at.isoformat(),
                },
            }
        )
    return {
        "revision": cache.entries_revision,
        "bundle": None if cache.bundle is None else _bundle(cache.bundle),
        "federated": [
            _bundle(b) for _, b in sorted(cache.federated.items(), key=lambda i: str(i[0]))
        ],
        "entries": entries,
    }


def _from_loopback(request: web.Request) -> bool:
    if request.remote is None:
        return False
    try:
        address = ipaddress.ip_address(request.remote)
    except ValueError:  # not an IP address: not a TCP peer we can vouch for
        return False
    # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d, which is_loopback (before
    # Python 3.13) does not look through.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class AdminServer:
    def __init__(
        self,
        rotator: Rotator,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        socket_path: Path | None = None,
        kubernetes: bool = False,
    ) -> None:
        self.rotator = rotator
        self.host = host
        self.port = port
        self.socket_path = socket_path
        self.kubernetes = kubernetes
        self._runner: web.AppRunner | None = None

    def describe(self) -> dict[str, Any]:
        rotator = self.rotator
        agent = rotator.upstream.agent_svid
        _, health = rotator.health()
        return {
            "node": rotator.node,
            "status": health["status"],
            "identity": None
            if agent is None
            else {"spiffe_id": str(agent.spiffe_id), **_certificate(agent.leaf)},
            "upstream": {
                **describe_upstream(rotator.upstream),
                "reachable": rotator.upstream_up,
                "unreachable_since": _moment(rotator.unreachable_since),
                "last_error": rotator.last_error,
                "last_sync": _moment(rotator.last_sync),
            },
            "workload_api": {
                "socket": None if self.socket_path is None else str(self.socket_path),
                # Which selectors workloads are attested by: unix (SO_PEERCRED and /proc)
                # always, plus k8s (the pod of the caller's cgroup) in a cluster.
                "workload_attestation": ["unix", "k8s"] if self.kubernetes else ["unix"],
            },
            "cache": describe_cache(rotator.cache),
        }

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/config", self._config)
        return app

    async def _config(self, request: web.Request) -> web.Response:
        if not _from_loopback(request):
            return web.json_response(
                {"error": "/config answers loopback callers only (use kubectl port-forward)"},
                status=403,
            )
        return web.json_response(self.describe())

    async def _healthz(self, request: web.Request) -> web.Response:
        serving, details = self.rotator.health()
        return web.json_response(details, status=200 if serving else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.rotator.synced.is_set()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _livez(self, request: web.Request) -> web.Response:
        live, why = self.rotator.live()
        return web.json_response({"live": live, "reason": why}, status=200 if live else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.rotator.metrics.registry)
        response = web.Response(body=body)
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
