"""The agent process: rotator + Workload API (behind the SO_PEERCRED front) + admin port.

``Agent(config, upstream).run()`` is the whole of ``trellis agent``; tests build one with an
``InProcessUpstream`` and run it inside their own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from ca.agent.admin import AdminServer
from ca.agent.attestation import SelectorPlugin, UnixAttestor, WorkloadAttestor
from ca.agent.k8s import InClusterConfig, PodAttestor, PodIndex, watch_pods
from ca.agent.metrics import AgentMetrics
from ca.agent.peercred import PeerRegistry, UdsFront, remove_stale_front_dirs
from ca.agent.rotator import Rotator, RotatorConfig
from ca.agent.stek import SessionKeysApi, StekFollower, StekSource, StekStore
from ca.agent.upstream import Upstream
from ca.agent.workload_api import WorkloadApi, WorkloadApiConfig, server_options
from ca.bundle import TrustBundle

__all__ = ["DEFAULT_SOCKET", "Agent", "AgentConfig"]

log = logging.getLogger("trellis.agent")

DEFAULT_SOCKET = Path("/run/trellis/agent.sock")


@dataclass(frozen=True)
class AgentConfig:
    socket_path: Path = DEFAULT_SOCKET
    socket_mode: int = 0o666
    node: str | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int | None = 8089  # None: no admin endpoint
    kubernetes: bool = False
    rotator: RotatorConfig = field(default_factory=RotatorConfig)
    workload_api: WorkloadApiConfig = field(default_factory=WorkloadApiConfig)
    proc_root: Path = Path("/proc")


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        upstream: Upstream,
        *,
        initial_bundle: TrustBundle | None = None,
        plugins: tuple[SelectorPlugin, ...] = (),
    ) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.rotator = Rotator(
            upstream,
            config=config.rotator,
            metrics=self.metrics,
            initial_bundle=initial_bundle,
        )
        self.rotator.node = config.node
        self.peers = PeerRegistry()
        unix = UnixAttestor(config.proc_root)
        self.pods: PodIndex | None = PodIndex() if config.kubernetes else None
        all_plugins = plugins + ((PodAttestor(self.pods),) if self.pods is not None else ())
        self.attestor = WorkloadAttestor(unix, all_plugins)
        self.front = UdsFront(
            config.socket_path,
            mode=config.socket_mode,
            registry=self.peers,
            snapshot=unix.snapshot,
        )
        self.api = WorkloadApi(self.rotator, self.peers, self.attestor, config=config.workload_api)
        # STEK rings (ca.agent.stek): followed from a CA that streams them, served beside the
        # SPIFFE service on the same socket. An in-process upstream has none to follow.
        self.steks = StekStore()
        self.session_keys = SessionKeysApi(self.api, self.steks)
        self.stek_follower = (
            StekFollower(upstream, self.steks, self.rotator.synced, clock=time.time)
            if isinstance(upstream, StekSource)
            else None
        )
        self.admin = (
            AdminServer(
                self.rotator,
                config.admin_host,
                config.admin_port,
                socket_path=config.socket_path,
                kubernetes=config.kubernetes,
            )
            if config.admin_port is not None
            else None
        )
        self._server: grpc.aio.Server | None = None
        self.started = asyncio.Event()

    async def start(self) -> None:
        """Bind everything; SVIDs arrive as the rotator syncs (callers wait or get UNAVAILABLE)."""
        for stale in remove_stale_front_dirs(self.front.temp_base):
            log.info("removed %s, left by an agent that no longer runs", stale)
        server = grpc.aio.server(options=server_options())
        server.add_generic_rpc_handlers(
            (self.api.generic_handler(), self.session_keys.generic_handler())
        )
        server.add_insecure_port(self.front.internal_address)
        await server.start()
        self._server = server
        await self.front.start()
        if self.admin is not None:
            port = await self.admin.start()
            log.info("admin endpoint on http://%s:%d", self.config.admin_host, port)
        log.info("Workload API on unix:%s", self.config.socket_path)
        self.started.set()

    async def run(self) -> None:
        try:
            await self.start()
            async with asyncio.TaskGroup() as group:
                group.create_task(self.rotator.run())
                if self.stek_follower is not None:
                    group.create_task(self.stek_follower.run())
                if self.pods is not None and self.config.node:
                    group.create_task(
                        watch_pods(InClusterConfig.from_environment(), self.config.node, self.pods)
                    )
        finally:
            await self.close()

    async def close(self) -> None:
        await self.front.close()
        if self._server is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._server.stop(grace=0.5)
            self._server = None
        if self.admin is not None:
            await self.admin.close()
        await self.rotator.issuer.close()
        await self.rotator.upstream.close()
