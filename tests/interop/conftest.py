"""Fixtures for the reference-implementation peers: the Go programs, a CA + agent mesh.

The Go programs (``go/``) are built once per test session into a cache outside the tree
(``go_peers.py``); a missing toolchain or module proxy is a skip naming what is missing,
which CI (``CI=true``, see tests/conftest.py) turns into a failure.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ca import JwtAuthority, RootAuthority, TrustDomain
from ca.store import CaStore
from tests.ca.agent.test_e2e_federation import federation  # noqa: F401  (reused fixture)
from tests.ca.agent.test_e2e_pyspiffe import Mesh
from tests.sidecar.dataplane.conftest import procs  # noqa: F401  (reused fixture)

from .go_peers import GoPeersUnavailable, build


@dataclass(frozen=True)
class GoPeers:
    """Paths of the built Go programs."""

    folder: Path

    @property
    def workload(self) -> Path:
        return self.folder / "workload"

    @property
    def spiffetls(self) -> Path:
        return self.folder / "spiffetls"

    @property
    def tlspeer(self) -> Path:
        return self.folder / "tlspeer"

    @property
    def echpeer(self) -> Path:
        return self.folder / "echpeer"


@pytest.fixture(scope="session")
def go_peers() -> GoPeers:
    try:
        return GoPeers(build())
    except GoPeersUnavailable as exc:
        pytest.skip(f"Go interop peers: {exc}")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory for Unix sockets (sun_path is at most 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tr-go-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_ca_dir(directory: Path, trust_domain: str = "example.org", cluster: str = "west") -> None:
    now = dt.datetime.now(dt.UTC)
    store = CaStore(directory)
    root = RootAuthority.create(TrustDomain(trust_domain), now=now)
    store.save_root(root, b"e2e-passphrase-123")
    store.save_intermediate(root.issue_intermediate(cluster, now=now), JwtAuthority.generate())


def entries_yaml(*entries: tuple[str, str, list[str], list[str]]) -> str:
    """(id, spiffe_id, selectors, extra lines) per entry, all for node-a."""
    lines = ["entries:"]
    for entry_id, spiffe_id, selectors, extra in entries:
        lines += [
            f"  - id: {entry_id}",
            f"    spiffe_id: {spiffe_id}",
            f"    selectors: [{', '.join(selectors)}]",
            "    nodes: [node-a]",
            *(f"    {line}" for line in extra),
        ]
    return "\n".join(lines) + "\n"


def by_path(executable: Path | str) -> str:
    """The agent attests a process's executable by /proc/<pid>/exe, a resolved path."""
    return f"unix:path:{os.path.realpath(executable)}"


def by_uid() -> str:
    return f"unix:uid:{os.getuid()}"


MeshFactory = Callable[[str], Mesh]


@pytest.fixture
def agent_mesh(tmp_path: Path, short_dir: Path) -> Iterator[MeshFactory]:
    """Start ``trellis ca serve`` and ``trellis agent`` (real processes) with these entries."""
    started: list[Mesh] = []

    def start(entries: str, *ca_extra: str) -> Mesh:
        make_ca_dir(tmp_path / "ca")
        (tmp_path / "entries.yaml").write_text(entries)
        mesh = Mesh(tmp_path, short_dir / "agent.sock")
        started.append(mesh)
        mesh.start_ca(mint_token=True, extra=list(ca_extra))
        mesh.start_agent()
        return mesh

    try:
        yield start
    finally:
        for mesh in started:
            logs = mesh.stop()
            if os.environ.get("TRELLIS_TEST_LOGS"):
                print("\n".join(logs))
