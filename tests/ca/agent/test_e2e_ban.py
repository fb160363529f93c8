"""Banning a node with real processes: ``trellis ca ban`` → ``ca serve`` → ``trellis agent``.

The agent of a banned node is refused by the CA, says so in its metrics, and keeps serving
the SVIDs it has cached (valid for an hour here); ``trellis ca unban`` restores it without
restarting either process.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port, wait_for

from .test_e2e_pyspiffe import REPO, WEB, Mesh, _client, _make_ca_dir, write_web_entry


def _metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _ban(verb: str, bans: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "trellis", "ca", verb, "node-a", "--file", str(bans)],
        check=True, capture_output=True, cwd=REPO, timeout=60,
    )  # fmt: skip


@pytest.fixture
def banning_mesh(tmp_path: Path, short_dir: Path) -> Iterator[tuple[Mesh, Path, int, int]]:
    _make_ca_dir(tmp_path / "ca")
    write_web_entry(tmp_path / "entries.yaml")
    bans = tmp_path / "banned.yaml"
    bans.write_text("[]\n")
    ca_metrics, agent_admin = free_port(), free_port()
    mesh = Mesh(
        tmp_path, short_dir / "agent.sock", agent_extra=["--admin", f"127.0.0.1:{agent_admin}"]
    )
    mesh.start_ca(
        mint_token=True,
        extra=["--banned-agents", str(bans), "--poll-interval", "0.1",
               "--metrics-listen", f"127.0.0.1:{ca_metrics}"],
    )  # fmt: skip
    mesh.start_agent()
    try:
        yield mesh, bans, ca_metrics, agent_admin
    finally:
        mesh.stop()


def test_a_banned_agent_is_refused_keeps_its_cache_and_recovers_when_unbanned(
    banning_mesh: tuple[Mesh, Path, int, int],
) -> None:
    mesh, bans, ca_metrics, agent_admin = banning_mesh
    up = "trellis_agent_upstream_up"
    refusals = "trellis_agent_upstream_refusals_total"
    wait_for(lambda: _metric(agent_admin, up) == 1, 40, "the agent's first sync")
    with _client(mesh) as client:
        before = client.fetch_x509_svid()

    _ban("ban", bans)
    wait_for(
        lambda: _metric(agent_admin, refusals, reason="permission-denied") > 0,
        30,
        "the agent to report the CA's refusal",
    )
    assert _metric(agent_admin, up) == 0
    assert _metric(ca_metrics, "trellis_ca_requests_rejected_total", reason="agent-banned") > 0
    with _client(mesh) as client:
        during = client.fetch_x509_svid()  # still served from the cache
    assert str(during.spiffe_id) == WEB
    assert during.leaf.serial_number == before.leaf.serial_number

    _ban("unban", bans)
    wait_for(lambda: _metric(agent_admin, up) == 1, 30, "the agent to reach the CA again")
    assert mesh.agent is not None and mesh.agent.poll() is None
    assert mesh.ca is not None and mesh.ca.poll() is None
