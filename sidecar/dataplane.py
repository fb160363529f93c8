"""`Sidecar`: the running data plane, wiring identity, inbound, outbound, pools and admin.

Start-up order: admin first (so /healthz answers and /readyz says why not ready), then the
identity source, then the listeners. Ready = holds an unexpired SVID and a bundle, and
every listener is bound. SIGTERM/SIGINT drain: /readyz turns 503, listeners close, every
session sends GOAWAY, and the process exits once the streams finished or
`drain_timeout` passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from core.eventloop import settle_heap
from meshapi.registry import MeshRegistry

from .admin import AdminServers, start_admin
from .config import SidecarConfig
from .identity import Identity, IdentityError, WorkloadApiWatcher, load_svid_dir
from .inbound import Inbound
from .metrics import Metrics
from .offload import kernel_tls
from .outbound import Outbound
from .permissive import STRICT, PlaintextPolicy, plaintext_policy_for_pod
from .policy import Authorizer, authorizer_for_pod, merge, parse_pod_labels
from .stek import SessionKeys, StekCollector, StekRingWatcher
from .tls.tickets import StekRing

logger = logging.getLogger("sidecar")

__all__ = ["Sidecar", "StartupError"]


class StartupError(Exception):
    pass


class Sidecar:
    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.identity = Identity(on_change=self._identity_changed)
        # The service's shared STEK ring, from the agent (sidecar.stek); none with --svid-dir.
        self.session_keys = SessionKeys(config.spiffe_id)
        self.session_keys.on_ring = self._ticket_ring_changed
        self.session_keys.on_ech = self._ech_changed
        self.metrics.registry.register(StekCollector(self.session_keys))
        self.stek_watcher: StekRingWatcher | None = None
        self._plaintext: PlaintextPolicy = STRICT
        self._registry: MeshRegistry | None = None
        self._authorizer, self._plaintext, self._registry = self._load_policy()
        self._policy_mtime = self._policy_stamp()
        self._policy_files = self._policy_files_present()
        from .pool import PoolSet

        self.pools = PoolSet(
            self.identity, self.metrics, config.pool, drain_timeout=config.drain_timeout
        )
        self.inbound = Inbound(
            config.inbound,
            self.identity,
            self.metrics,
            lambda: self._authorizer,
            keepalive_interval=config.pool.keepalive_interval,
            keepalive_timeout=config.pool.keepalive_timeout,
            drain_timeout=config.drain_timeout,
            connect_timeout=config.pool.connect_timeout,
            own_ports=config.own_ports(),
            plaintext=lambda: self._plaintext,
        )
        self.outbound = Outbound(
            self.pools,
            self.metrics,
            config.inbound.listen.port,
            registry=lambda: self._registry,
            connect_timeout=config.pool.connect_timeout,
        )
        # kTLS: probed once (`sidecar.ktls.probe`, logged once when absent), per direction.
        wanted = any(u.ktls == "auto" for u in config.upstreams)
        self.metrics.ktls.enabled = {
            "inbound": kernel_tls("auto"),
            "outbound": wanted and kernel_tls("auto"),
        }
        self.watcher: WorkloadApiWatcher | None = None
        self.listening = False
        self.draining = False
        self._admin: AdminServers | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()

    def _ticket_ring_changed(self, ring: StekRing | None) -> None:
        # None: no ring from the agent, or it aged out; new handshakes then send no tickets
        # and resume nothing (full handshakes), never under a key only this replica holds.
        self.identity.ticket_ring = ring

    def _ech_changed(self) -> None:
        # RFC 9849: our service's keys for the inbound side, every service's current
        # config for the callers we dial (sidecar.echkeys builds both as the CA meant).
        from .echkeys import ech_config_list, ech_key

        now = time.time()
        keys = self.session_keys
        try:
            own = [ech_key(k) for k in keys.ech_keys_at(now)]
            configs = {
                spiffe_id: ech_config_list(parts)
                for spiffe_id in keys.ech_public
                if (parts := keys.ech_public_for(spiffe_id, now))
            }
        except ValueError as exc:  # a key the engine cannot use: keep the ones we have
            logger.warning("ECH keys from the agent not usable: %s", exc)
            return
        self.identity.set_ech(own, configs)

    # --- policy --------------------------------------------------------------------------

    def _policy_stamp(self) -> tuple[float, float]:
        stamps = []
        for name in (self.config.policy_file, self.config.pod_labels_file):
            try:
                stamps.append(Path(name).stat().st_mtime if name else 0.0)
            except OSError:
                stamps.append(0.0)
        return stamps[0], stamps[1]

    def _policy_files_present(self) -> frozenset[tuple[str, str]]:
        named = (
            ("--policy", self.config.policy_file),
            ("--pod-labels", self.config.pod_labels_file),
        )
        return frozenset((flag, name) for flag, name in named if name and Path(name).exists())

    def _load_policy(self) -> tuple[Authorizer, PlaintextPolicy, MeshRegistry | None]:
        """The YAML targets' rules plus the operator's document (if mounted) for our labels,
        the document's mTLS modes for them (strict without a document), and its mesh
        registry (None without one: every outbound destination is then in the mesh)."""
        from meshapi.policy import parse_policy_document

        from .policy import CallerRule

        per_port: dict[int, tuple[CallerRule, ...]] = {
            port: target.allow
            for port, target in self.config.inbound.targets.items()
            if target.allow is not None
        }
        # Named as a refused caller and the access log see them: where the rules are.
        sources = {port: (f"inbound.targets.{port}.allow",) for port in per_port}
        parts = [Authorizer(per_port, sources=sources)]
        plaintext = STRICT
        registry: MeshRegistry | None = None
        policy_file = self.config.policy_file
        if policy_file and Path(policy_file).exists():
            labels: dict[str, str] = {}
            labels_file = self.config.pod_labels_file
            if labels_file and Path(labels_file).exists():
                try:
                    labels = parse_pod_labels(Path(labels_file).read_text())
                except (OSError, ValueError) as exc:  # unreadable, not UTF-8, or a bad line
                    raise StartupError(f"--pod-labels {labels_file}: {exc}") from exc
            try:
                document = json.loads(Path(policy_file).read_text() or "{}")
            except json.JSONDecodeError as exc:
                raise StartupError(f"--policy {policy_file}: not JSON: {exc}") from exc
            except (OSError, UnicodeDecodeError) as exc:  # e.g. the path is now a directory
                raise StartupError(f"--policy {policy_file}: cannot read: {exc}") from exc
            except RecursionError as exc:
                # json's C decoder recurses once per nesting level: a deep enough document
                # would otherwise escape the reload and end the maintenance loop with it.
                raise StartupError(f"--policy {policy_file}: nested too deeply") from exc
            try:
                parsed = parse_policy_document(document, "policy")
            except ValueError as exc:  # PolicyError names the field
                raise StartupError(f"--policy {policy_file}: {exc}") from exc
            parts.append(authorizer_for_pod(parsed, labels))
            plaintext = plaintext_policy_for_pod(parsed, labels)
            registry = parsed.mesh
            if plaintext.permissive and self.config.mode != "transparent":
                # The app port a plaintext caller means is only known from the redirect
                # (SO_ORIGINAL_DST); explicit mode has none, so it stays strict, loudly.
                logger.warning(
                    "--policy %s: mtls PERMISSIVE needs mode: transparent (the caller's "
                    "port comes from the redirect); callers without TLS stay refused",
                    policy_file,
                )
                plaintext = STRICT
        return merge(parts), plaintext, registry

    def _reload_policy(self) -> None:
        stamp = self._policy_stamp()
        if stamp == self._policy_mtime:
            return
        self._policy_mtime = stamp
        try:
            # A file that was there and is gone is refused like a broken one: read as "no
            # operator policy", it would open every port to the own trust domain (the
            # default) until it came back. Missing at start-up, it is simply not used yet.
            present = self._policy_files_present()
            gone = sorted(self._policy_files - present)
            if gone:
                raise StartupError("; ".join(f"{flag} {name} is gone" for flag, name in gone))
            self._authorizer, self._plaintext, self._registry = self._load_policy()
            self._policy_files = present
            logger.info("policy reloaded")
        except (StartupError, ValueError) as exc:
            logger.warning("policy reload failed, keeping the previous one: %s", exc)

    # --- identity ------------------------------------------------------------------------

    def _identity_changed(self) -> None:
        self.metrics.svid_updates.inc()
        svid = self.identity.svid
        # 0 once withdrawn: an expiry alert must not keep reading the old SVID's notAfter.
        self.metrics.svid_expiry.set(svid.not_after.timestamp() if svid is not None else 0)

    # --- lifecycle -----------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.identity.ready(dt.datetime.now(dt.UTC)):
            if self.watcher is not None and self.watcher.last_error:
                return False, f"no valid SVID yet ({self.watcher.last_error})"
            return False, "no valid SVID yet"
        if not self.listening:
            return False, "listeners not bound"
        return True, "ready"

    async def start(self) -> None:
        config = self.config
        self._admin = await start_admin(self, config.admin, config.health)
        if config.svid_dir is not None:
            try:
                svid, bundles = load_svid_dir(config.svid_dir)
            except IdentityError as exc:
                raise StartupError(str(exc)) from exc
            self.identity.update(svid=svid, bundles=bundles)
        else:
            target = config.workload_api_target()
            if target is None:
                raise StartupError(
                    "no identity source: set SPIFFE_ENDPOINT_SOCKET, workload_api_socket "
                    "or --svid-dir"
                )
            self.watcher = WorkloadApiWatcher(target, self.identity, config.spiffe_id)
            self._tasks.append(asyncio.create_task(self.watcher.run()))
            self.stek_watcher = StekRingWatcher(target, self.session_keys)
            self._tasks.append(asyncio.create_task(self.stek_watcher.run()))
        await self.inbound.start(ipv6_twin=config.mode == "transparent")
        for upstream in config.upstreams:
            await self.outbound.listen_upstream(upstream)
        if config.mode == "transparent":
            await self.outbound.listen_transparent(config.outbound)
        self.listening = True
        self._tasks.append(asyncio.create_task(self._maintenance()))
        logger.info("sidecar listening: %s", json.dumps(self.ports()))

    def ports(self) -> dict[str, Any]:
        config = self.config
        return {
            "inbound": str(config.inbound.listen),
            "admin": str(config.admin) if config.admin else None,
            "health": str(config.health) if config.health else None,
            "outbound": str(config.outbound) if config.mode == "transparent" else None,
            "upstreams": {u.name: str(u.listen) for u in config.upstreams},
        }

    async def _maintenance(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.pools.sweep(time.monotonic())
            self._reload_policy()
            self.session_keys.tick(time.time())

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        await self.start()
        # A full collection is a latency spike on every open stream (core.eventloop).
        settle_heap()
        print(json.dumps({"event": "ready-to-serve", **self.ports()}), flush=True)
        await self._stop.wait()
        await self.drain()

    async def drain(self) -> None:
        self.draining = True
        logger.info("draining (up to %.1fs)", self.config.drain_timeout)
        self.outbound.close_listeners()
        self.inbound.drain()
        self.pools.drain()
        deadline = time.monotonic() + self.config.drain_timeout
        while time.monotonic() < deadline:
            direct = self.outbound.direct_links or self.inbound.direct_links
            if not self.outbound.bridges and not self.inbound.active_streams and not direct:
                break
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._admin is not None:
            await self._admin.cleanup()

    def describe(self) -> dict[str, Any]:
        config = self.config
        return {
            "mode": config.mode,
            "ready": self.readiness()[1],
            "identity": self.identity.describe(),
            "listeners": self.ports(),
            "upstreams": [
                {
                    "name": u.name,
                    "listen": str(u.listen),
                    "target": u.target,
                    "endpoints": [str(e) for e in u.endpoints],
                    "spiffe_ids": [str(i) for i in u.spiffe_ids],
                }
                for u in config.upstreams
            ],
            "inbound": {
                "targets": {str(p): str(t.app) for p, t in sorted(config.inbound.targets.items())},
                "connections": len(self.inbound.sessions),
                "streams": self.inbound.active_streams,
                "policy": self._authorizer.describe(),
                "mtls": self._plaintext.describe(),
            },
            "mesh": None
            if self._registry is None
            else {
                "outboundTrafficPolicy": self._registry.outbound_traffic_policy,
                "destinations": [str(n) for n in self._registry.destinations],
            },
            "pools": self.pools.describe(),
            # Each direct connection (one per app connection) and its data path.
            "direct": {
                "outbound": [link.describe() for link in self.outbound.direct_links],
                "inbound": [link.describe() for link in self.inbound.direct_links],
            },
            "inbound_connections": [
                {"peer": str(s.peer_id) if s.peer_id else None, "data_path": s.data_path}
                for s in self.inbound.sessions
            ],
            "workload_api": {
                "target": self.watcher.target if self.watcher else None,
                "last_error": self.watcher.last_error if self.watcher else None,
            },
            # Key ids and ages only, never a key.
            "stek_ring": {
                **self.session_keys.describe(),
                "last_error": self.stek_watcher.last_error if self.stek_watcher else None,
            },
        }
