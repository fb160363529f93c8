"""Fixtures for the agent tests: a live CA hierarchy, entries, and an in-process agent.

Async test bodies run under ``run`` (asyncio.run with a deadline; no pytest-asyncio).
Sockets live in short private temporary directories (a Unix socket path is limited to
108 bytes, which pytest's tmp_path can exceed).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ca import IntermediateAuthority, JwtAuthority, RootAuthority, TrustBundle, TrustDomain
from ca.agent import Agent, AgentConfig, InProcessUpstream, RotatorConfig
from ca.entries import RegistrationEntry

T = TypeVar("T")
TD = TrustDomain("example.org")
WEB = "spiffe://example.org/ns/default/sa/web"


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass(frozen=True)
class LiveCa:
    root: RootAuthority
    intermediate: IntermediateAuthority
    jwt: JwtAuthority
    bundle: TrustBundle


@pytest.fixture(scope="session")
def live_ca() -> LiveCa:
    now = dt.datetime.now(dt.UTC)
    root = RootAuthority.create(TD, now=now)
    intermediate = root.issue_intermediate("agent-tests", now=now)
    jwt = JwtAuthority.generate()
    bundle = TrustBundle(TD, (root.certificate,)).with_jwt_authority(jwt.key_id, jwt.public_key)
    return LiveCa(root, intermediate, jwt, bundle)


def entry(
    spiffe_id: str = WEB,
    selectors: Sequence[str] = (f"unix:uid:{os.getuid()}",),
    *,
    ttl: float = 3600,
    nodes: Sequence[str] = ("*",),
    entry_id: str | None = None,
) -> RegistrationEntry:
    return RegistrationEntry.create(
        spiffe_id,
        list(selectors),
        nodes=list(nodes),
        entry_id=entry_id,
        x509_svid_ttl=dt.timedelta(seconds=ttl),
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tr-agent-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_upstream(
    ca: LiveCa, entries: Sequence[RegistrationEntry], *, node: str = "node-a"
) -> InProcessUpstream:
    return InProcessUpstream(ca.intermediate, ca.jwt, ca.bundle, entries, node=node)


@contextlib.asynccontextmanager
async def running_agent(
    upstream: InProcessUpstream, socket_dir: Path, **overrides: Any
) -> AsyncIterator[Agent]:
    rotator = RotatorConfig(sync_interval=overrides.pop("sync_interval", 0.2), backoff_cap=0.5)
    config = AgentConfig(
        socket_path=socket_dir / "agent.sock",
        node="node-a",
        admin_port=overrides.pop("admin_port", None),
        rotator=rotator,
    )
    plugins = overrides.pop("plugins", ())
    wait_synced = overrides.pop("wait_synced", True)  # False: yield before the first sync
    config = replace(config, **overrides)
    agent = Agent(config, upstream, plugins=plugins)
    task = asyncio.create_task(agent.run())
    await agent.started.wait()
    if wait_synced:
        await asyncio.wait_for(agent.rotator.synced.wait(), 10)
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
