"""The agent's Workload API logs who it refused and to whom it issued, as JSON lines.

A real ``trellis agent`` process (``--local-ca``: it signs in-process from a CA directory,
no CA server needed) serves the Workload API on a Unix socket; this test process is the
workload, calling over that socket with grpc. The agent's standard error is a pipe, so its
logs are JSON lines (``core.logs``), parsed here. The caller's pid/uid in them are what the
kernel said over SO_PEERCRED, i.e. this process's.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ca import JwtAuthority, RootAuthority, TrustDomain
from ca.agent.workload_client import WorkloadApiError, WorkloadClient
from ca.store import CaStore
from tests.support import wait_for

WEB = "spiffe://example.org/ns/default/sa/web"
OTHER = "spiffe://example.org/ns/default/sa/other"
REPO = Path(__file__).resolve().parents[3]


@dataclass
class Agent:
    process: subprocess.Popen[str]
    socket_path: Path

    def client(self, **kwargs: Any) -> WorkloadClient:
        return WorkloadClient(f"unix:{self.socket_path}", timeout=15, **kwargs)

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM, then the JSON lines it wrote to standard error."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        assert self.process.stderr is not None
        text = self.process.stderr.read()
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def agent(tmp_path: Path, short_dir: Path) -> Iterator[Agent]:
    now = dt.datetime.now(dt.UTC)
    store = CaStore(tmp_path / "ca")
    root = RootAuthority.create(TrustDomain("example.org"), now=now)
    store.save_root(root, b"log-test-passphrase")
    store.save_intermediate(root.issue_intermediate("west", now=now), JwtAuthority.generate())
    entries = tmp_path / "entries.yaml"
    entries.write_text(
        "entries:\n  - id: web\n"
        f"    spiffe_id: {WEB}\n    selectors: [unix:uid:{os.getuid()}]\n    nodes: [node-a]\n"
    )
    socket_path = short_dir / "agent.sock"
    argv = [
        sys.executable, "-m", "trellis", "agent", "--local-ca", str(tmp_path / "ca"),
        "--cluster", "west", "--entries", str(entries), "--node", "node-a",
        "--socket", str(socket_path), "--data-dir", str(tmp_path / "data"), "--admin", "off",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    running = Agent(process, socket_path)
    try:
        wait_for(lambda: socket_path.exists() or process.poll() is not None, 30, "agent socket")
        assert process.poll() is None, running.stop()
        yield running
    finally:
        running.stop()


def test_a_refused_workload_api_call_is_logged_with_the_callers_pid_and_uid(agent: Agent) -> None:
    with agent.client(send_header=False) as client, pytest.raises(WorkloadApiError) as missing:
        client.fetch_x509_svid()
    assert missing.value.code == "INVALID_ARGUMENT"
    with agent.client() as client, pytest.raises(WorkloadApiError) as foreign:
        client.fetch_jwt_svid(["db"], spiffe_id=OTHER)
    assert foreign.value.code == "PERMISSION_DENIED"
    logs = agent.stop()

    refused = [line for line in logs if line["event"] == "workload-api-refused"]
    assert [(r["method"], r["code"]) for r in refused] == [
        ("FetchX509SVID", "INVALID_ARGUMENT"),
        ("FetchJWTSVID", "PERMISSION_DENIED"),
    ]
    for line in refused:
        assert line["level"] == "warning"  # shown at the agent's default level
        assert line["logger"] == "trellis.agent.workload_api"
        assert (line["pid"], line["uid"]) == (os.getpid(), os.getuid())
    assert refused[0]["reason"] == "security header missing from request"
    assert refused[1]["reason"] == f"no identity issued for {OTHER}"


def test_issued_svids_are_logged_with_the_spiffe_id_and_the_caller(agent: Agent) -> None:
    with agent.client() as client:
        assert client.fetch_x509_svid().svids[0].spiffe_id == WEB
        jwt = client.fetch_jwt_svid(["db"])
    assert jwt.svids[0].spiffe_id == WEB
    logs = agent.stop()

    sent = [line for line in logs if line["event"] == "x509-svid-sent"]
    issued = [line for line in logs if line["event"] == "jwt-svid-issued"]
    assert sent and issued
    for line in (sent[0], issued[0]):
        assert line["level"] == "info"
        assert line["spiffe_ids"] == [WEB]
        assert (line["pid"], line["uid"]) == (os.getpid(), os.getuid())
    assert issued[0]["audience"] == ["db"]
    # Names and IDs only: no key, certificate or token ever reaches a log line.
    text = json.dumps(logs)
    assert jwt.svids[0].svid not in text
    assert "PRIVATE KEY" not in text
