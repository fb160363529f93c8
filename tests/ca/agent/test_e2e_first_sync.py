"""A workload that calls a real ``trellis agent`` before the agent has reached its CA.

The agent is started first, with a join token made offline (``trellis ca token create``),
and no CA running: it opens its Workload API socket and keeps retrying attestation. A
py-spiffe client calls then; only once its call is in flight at the agent is ``trellis ca
serve`` started. The call is answered with the right SVID as soon as the agent has
attested and synced. Without a CA at all, the call ends UNAVAILABLE after ``--sync-wait``,
saying why -- never PERMISSION_DENIED.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ca.agent.workload_client import WorkloadApiError, WorkloadClient
from tests.support import free_port, wait_for

from .test_e2e_ban import _metric
from .test_e2e_pyspiffe import REPO, WEB, Mesh, _client, _make_ca_dir, write_web_entry


def _healthz(port: int) -> tuple[int, dict[str, Any]]:
    """The status and body of the agent's /healthz; (0, {}) while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return 0, {}  # the agent process has not bound its admin port yet
        raise


@pytest.fixture
def early_mesh(tmp_path: Path, short_dir: Path) -> Iterator[tuple[Mesh, int]]:
    """A CA directory and an agent that is running, but no CA server yet."""
    _make_ca_dir(tmp_path / "ca")
    write_web_entry(tmp_path / "entries.yaml")
    token = subprocess.run(
        [sys.executable, "-m", "trellis", "ca", "token", "create", "--dir", str(tmp_path / "ca"),
         "--cluster", "west", "--node", "node-a"],
        check=True, capture_output=True, text=True, cwd=REPO, timeout=60,
    ).stdout.strip()  # fmt: skip
    admin = free_port()
    mesh = Mesh(
        tmp_path,
        short_dir / "agent.sock",
        join_token=token,
        agent_extra=["--admin", f"127.0.0.1:{admin}", "--sync-wait", "2m"],
    )
    mesh.start_agent()  # returns once the socket exists
    try:
        yield mesh, admin
    finally:
        mesh.stop()


def test_a_py_spiffe_call_made_before_the_agent_reached_its_ca_gets_the_svid_once_it_has(
    early_mesh: tuple[Mesh, int],
) -> None:
    mesh, admin = early_mesh
    wait_for(lambda: _healthz(admin)[1].get("status") == "starting", 60, "the admin endpoint")
    with (
        _client(mesh) as client,
        concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool,
    ):
        call = pool.submit(client.fetch_x509_svid, timeout=180)
        # The call is in the agent's hands (an open FetchX509SVID stream), unanswered...
        wait_for(
            lambda: _metric(admin, "trellis_agent_workload_api_streams") >= 1,
            60,
            "the call to reach the agent",
        )
        assert _healthz(admin)[0] == 503
        assert not call.done()
        # ...and the CA comes up only now.
        mesh.start_ca(mint_token=False)
        svid = call.result(timeout=180)  # a hang guard: the answer comes with the sync
    assert str(svid.spiffe_id) == WEB
    assert svid.private_key.public_key() == svid.leaf.public_key()
    status, body = _healthz(admin)
    assert (status, body["status"], body["synced"]) == (200, "ok", True)
    assert (
        _metric(admin, "trellis_agent_workload_api_requests_total", code="PERMISSION_DENIED") == 0
    )


def test_with_no_ca_a_call_ends_unavailable_after_the_sync_wait_not_permission_denied(
    tmp_path: Path, short_dir: Path
) -> None:
    _make_ca_dir(tmp_path / "ca")
    mesh = Mesh(
        tmp_path,
        short_dir / "agent.sock",
        join_token="never-used-no-ca-answers",
        agent_extra=["--sync-wait", "1s"],
    )
    try:
        mesh.start_agent()
        with (
            WorkloadClient(f"unix:{mesh.socket_path}", timeout=60) as client,
            pytest.raises(WorkloadApiError) as info,
        ):
            client.fetch_x509_svid()
    finally:
        logs = mesh.stop()
    assert info.value.code == "UNAVAILABLE", logs
    assert "first sync with the CA" in str(info.value)
