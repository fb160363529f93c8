"""Fixtures for the CA server tests: a real CA directory and an in-process server.

Servers bind ephemeral loopback ports (port 0) and run on the test's own event loop; each
async test body runs under ``run`` (no pytest-asyncio needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ca import JwtAuthority, RootAuthority, TrustDomain
from ca.api import CaClient
from ca.server.app import CaServer, ServerConfig
from ca.server.service import ServiceConfig
from ca.store import CaStore

T = TypeVar("T")
PASSPHRASE = b"test-passphrase-123"
CLUSTER = "west"

ENTRIES_YAML = """\
entries:
  - id: web
    spiffe_id: spiffe://example.org/ns/default/sa/web
    selectors: [unix:uid:1000]
    nodes: [node-a]
    dns_names: [web.default.svc]
  - id: db
    spiffe_id: spiffe://example.org/ns/default/sa/db
    selectors: [unix:uid:1001]
    nodes: [node-b]
  - id: everywhere
    spiffe_id: spiffe://example.org/ns/default/sa/logger
    selectors: [unix:path:/usr/bin/logger]
    nodes: ["*"]
"""


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make_ca_dir(directory: Path) -> CaStore:
    now = dt.datetime.now(dt.UTC)
    store = CaStore(directory)
    root = RootAuthority.create(TrustDomain("example.org"), now=now)
    store.save_root(root, PASSPHRASE)
    store.save_intermediate(root.issue_intermediate(CLUSTER, now=now), JwtAuthority.generate())
    return store


@pytest.fixture(scope="session")
def session_ca(tmp_path_factory: pytest.TempPathFactory) -> CaStore:
    return make_ca_dir(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def ca_dir(session_ca: CaStore, tmp_path: Path) -> Path:
    """A private copy of the session CA (tests may add tokens or change the bundle)."""
    import shutil

    target = tmp_path / "ca"
    shutil.copytree(session_ca.root_dir, target)
    return target


@pytest.fixture
def entries_file(tmp_path: Path) -> Path:
    path = tmp_path / "entries.yaml"
    path.write_text(ENTRIES_YAML)
    return path


def server_config(ca_dir: Path, entries: Path | None = None, **service: Any) -> ServerConfig:
    return ServerConfig(
        ca_dir=ca_dir,
        cluster=CLUSTER,
        listen="127.0.0.1:0",
        attest_listen="127.0.0.1:0",
        bundle_listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        entries_path=entries,
        poll_interval=0.05,
        service=replace(ServiceConfig(), **service),
    )


@contextlib.asynccontextmanager
async def serving(config: ServerConfig) -> AsyncIterator[CaServer]:
    server = CaServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def client_for(server: CaServer, **kwargs: Any) -> CaClient:
    return CaClient(
        server.addresses["listen"],
        attest_address=server.addresses["attest_listen"],
        trust_roots=server.store.root_cert_path.read_bytes(),
        **kwargs,
    )


async def attested(server: CaServer, node: str) -> CaClient:
    """A client that has attested as ``node`` with a fresh join token."""
    token = server.join_tokens.issue(node, now=time.time(), ttl=600)
    client = client_for(server)
    await client.attest_with_join_token(token)
    return client


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
