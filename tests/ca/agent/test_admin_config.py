"""The agent's ``/config`` with real processes: ``trellis ca serve`` → ``trellis agent``.

The agent attests with a join token over the CA's real gRPC listeners; the test reads
``/config`` from the agent's admin port over HTTP and fetches the same SVID over the
Workload API with py-spiffe, as a workload would, to check the two agree and that no key
of either reaches the admin port.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.support import free_port, wait_for

from .test_e2e_pyspiffe import REPO, WEB, Mesh, _client, _make_ca_dir, write_web_entry


def _config(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except (urllib.error.URLError, OSError):
        return None


@pytest.fixture
def agent_mesh(tmp_path: Path, short_dir: Path) -> Iterator[tuple[Mesh, int]]:
    _make_ca_dir(tmp_path / "ca")
    write_web_entry(tmp_path / "entries.yaml")
    admin = free_port()
    mesh = Mesh(tmp_path, short_dir / "agent.sock", agent_extra=["--admin", f"127.0.0.1:{admin}"])
    mesh.start_ca(mint_token=True)
    mesh.start_agent()
    try:
        yield mesh, admin
    finally:
        mesh.stop()


def _synced(port: int) -> bool:
    config = _config(port)
    if config is None:
        return False
    entries = config["cache"]["entries"]
    return bool(entries) and all(e["svid"] is not None for e in entries)


def test_agent_config_names_its_identity_upstream_socket_and_cached_svids_without_keys(
    agent_mesh: tuple[Mesh, int],
) -> None:
    mesh, admin = agent_mesh
    wait_for(lambda: _synced(admin), 40, "an SVID for every entry in the agent's /config")
    with _client(mesh) as client:
        svid = client.fetch_x509_svid()
    config = _config(admin)
    assert config is not None

    assert config["node"] == "node-a"
    assert config["status"] == "ok"
    assert config["identity"]["spiffe_id"] == "spiffe://example.org/trellis/agent/node-a"
    upstream = config["upstream"]
    assert upstream["kind"] == "grpc"
    assert upstream["address"] == f"127.0.0.1:{mesh.ca_port}"
    assert upstream["attest_address"] == f"127.0.0.1:{mesh.attest_port}"
    assert upstream["attestation"] == "join_token"
    assert upstream["reachable"] is True
    assert config["workload_api"] == {
        "socket": str(mesh.socket_path),
        "workload_attestation": ["unix"],
    }
    assert config["cache"]["bundle"]["trust_domain"] == "example.org"
    (web,) = config["cache"]["entries"]
    assert web["id"] == "web"
    assert web["spiffe_id"] == WEB
    # The SVID the Workload API serves is the one /config describes (rotation may have
    # replaced it in between only if the TTL were short; entries here live an hour).
    assert web["svid"]["serial"] == format(svid.leaf.serial_number, "x")

    # No key, in any encoding: PEM, or the workload key's DER as base64 or hex.
    body = json.dumps(config)
    key_der = svid.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert "PRIVATE KEY" not in body
    assert base64.b64encode(key_der).decode()[:40] not in body
    assert key_der.hex()[:40] not in body


_CLIENT = """
import json, sys, time, urllib.error, urllib.request

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return None, str(exc)

deadline = time.monotonic() + 40
while get("http://127.0.0.1:8089/readyz")[0] != 200:
    if time.monotonic() > deadline:
        sys.exit("the agent never became ready")
    time.sleep(0.2)
outside = sys.argv[1]
print(json.dumps({
    "config_off_loopback": get(f"http://{outside}:8089/config"),
    "healthz_off_loopback": get(f"http://{outside}:8089/healthz")[0],
    "config_on_loopback": get("http://127.0.0.1:8089/config")[0],
}))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="a network namespace of its own needs root and iproute2",
)
def test_agent_config_is_refused_to_a_caller_off_loopback_while_health_still_answers(
    tmp_path: Path, short_dir: Path
) -> None:
    """In a cluster the agent's admin port listens on every address (probes, Prometheus):
    here the agent runs in a network namespace of the test's own, its admin port on
    0.0.0.0, and is asked from that namespace's loopback and from its other address."""
    _make_ca_dir(tmp_path / "ca")
    write_web_entry(tmp_path / "entries.yaml")
    namespace, outside = f"tr-agentcfg-{os.getpid()}", "10.213.77.1"
    subprocess.run(["ip", "netns", "add", namespace], check=True, timeout=30)
    agent: subprocess.Popen[str] | None = None
    try:
        # The namespace's own second address: a peer connecting from it is not loopback
        # (127.0.0.0/8, ::1), as a pod or node address would not be.
        for command in ("ip link set lo up", f"ip addr add {outside}/32 dev lo"):
            subprocess.run(
                ["ip", "netns", "exec", namespace, *command.split()], check=True, timeout=30
            )
        agent = subprocess.Popen(
            [
                "ip", "netns", "exec", namespace, sys.executable, "-m", "trellis", "agent",
                "--local-ca", str(tmp_path / "ca"), "--cluster", "west",
                "--entries", str(tmp_path / "entries.yaml"), "--node", "node-a",
                "--socket", str(short_dir / "agent.sock"), "--data-dir", str(tmp_path / "data"),
                "--admin", "0.0.0.0:8089",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        client = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", _CLIENT, outside],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        seen = json.loads(client.stdout)
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=20)
        subprocess.run(["ip", "netns", "del", namespace], check=False, timeout=30)
    status, body = seen["config_off_loopback"]
    assert status == 403
    assert json.loads(body) == {
        "error": "/config answers loopback callers only (use kubectl port-forward)"
    }
    assert seen["healthz_off_loopback"] == 200
    assert seen["config_on_loopback"] == 200
