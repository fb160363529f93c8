"""The CA server's admin socket and ``trellis ca entries list`` / ``agents list``, with real
processes: ``trellis ca serve --admin-socket`` and a ``trellis agent`` that attests to it
with a join token over the CA's gRPC listeners. Every command runs as its own process, as a
user would run it."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ca.agent.test_e2e_pyspiffe import WEB, Mesh, _make_ca_dir, write_web_entry
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[3]


def trellis(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def ca_with_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, Path]]:
    workdir = tmp_path_factory.mktemp("ca-admin")
    short = Path(tempfile.mkdtemp(prefix="tr-admin-"))  # a Unix socket path fits 108 bytes
    _make_ca_dir(workdir / "ca")
    write_web_entry(workdir / "entries.yaml")
    socket = short / "ca.sock"
    mesh = Mesh(workdir, short / "agent.sock")
    try:
        mesh.start_ca(mint_token=True, extra=["--admin-socket", str(socket)])
        mesh.start_agent()
        yield mesh, socket
    finally:
        mesh.stop()
        shutil.rmtree(short, ignore_errors=True)


def _agents(socket: Path) -> list[dict[str, Any]]:
    result = trellis("ca", "agents", "list", "--socket", str(socket), "-o", "json")
    assert result.returncode == 0, result.stderr
    agents: list[dict[str, Any]] = json.loads(result.stdout)["agents"]
    return agents


def test_entries_list_shows_the_entries_the_ca_serves_as_text_json_and_yaml(
    ca_with_agent: tuple[Mesh, Path],
) -> None:
    _, socket = ca_with_agent
    text = trellis("ca", "entries", "list", "--socket", str(socket))
    assert text.returncode == 0, text.stderr
    header, row = text.stdout.splitlines()
    assert header.split()[:3] == ["ID", "SPIFFE", "ID"]
    assert row.split()[:2] == ["web", WEB]
    assert f"unix:uid:{os.getuid()}" in row

    as_json = json.loads(
        trellis("ca", "entries", "list", "--socket", str(socket), "-o", "json").stdout
    )
    (entry,) = as_json["entries"]
    assert entry["id"] == "web"
    assert entry["spiffe_id"] == WEB
    assert entry["nodes"] == ["node-a"]
    as_yaml = yaml.safe_load(
        trellis("ca", "entries", "list", "--socket", str(socket), "-o", "yaml").stdout
    )
    assert as_yaml == as_json


def test_agents_list_shows_the_attested_agent_and_how_it_attested(
    ca_with_agent: tuple[Mesh, Path],
) -> None:
    _, socket = ca_with_agent
    wait_for(lambda: bool(_agents(socket)), 40, "the agent to attest")
    (agent,) = _agents(socket)
    assert agent["node"] == "node-a"
    assert agent["spiffe_id"] == "spiffe://example.org/trellis/agent/node-a"
    assert agent["attestation"] == "join_token"
    assert agent["banned"] is False
    text = trellis("ca", "agents", "list", "--socket", str(socket))
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[1].split()[:3] == [
        "node-a",
        "spiffe://example.org/trellis/agent/node-a",
        "join_token",
    ]


_OTHER_USER_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"GET /entries HTTP/1.0\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b"\\r\\n", 1)[0].decode())
print(data.partition(b"\\r\\n\\r\\n")[2].decode())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another uid needs root")
def test_admin_socket_is_private_to_the_ca_user_even_when_its_mode_is_widened(
    ca_with_agent: tuple[Mesh, Path],
) -> None:
    _, socket = ca_with_agent
    assert stat.S_IMODE(socket.stat().st_mode) == 0o600
    # Widen the mode and the parent directory, as a careless deployment might: the
    # SO_PEERCRED check still refuses a caller of another uid.
    socket.chmod(0o666)
    socket.parent.chmod(0o755)
    try:
        other = subprocess.run(
            ["/usr/bin/python3", "-c", _OTHER_USER_CLIENT, str(socket)],
            capture_output=True,
            text=True,
            timeout=30,
            user=65534,
            group=65534,
            cwd="/",
            check=False,
        )
    finally:
        socket.chmod(0o600)
        socket.parent.chmod(0o700)
    assert other.returncode == 0, other.stderr
    status, body = other.stdout.split("\n", 1)
    assert " 403 " in status
    assert WEB not in body
    assert "only uid 0 or root may use this socket" in body


def test_entries_list_with_the_ca_stopped_is_one_line_naming_the_socket(
    ca_with_agent: tuple[Mesh, Path],
) -> None:
    mesh, socket = ca_with_agent
    mesh.stop_ca()  # last in this module: the fixture's CA is gone from here on
    result = trellis("ca", "entries", "list", "--socket", str(socket))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"trellis: error: no CA admin socket at {socket} (is ca serve running with"
        " --admin-socket?)\n"
    )


@pytest.mark.parametrize("kind", ["a regular file", "a directory"])
def test_entries_list_on_a_path_that_is_not_a_socket_says_so_in_one_line(
    tmp_path: Path, kind: str
) -> None:
    """connect(2) answers ECONNREFUSED for a file or a folder just as for a socket nobody
    listens on; the command names the real mistake (as ``--socket /etc/passwd`` would)."""
    path = tmp_path / "passwd"
    if kind == "a directory":
        path.mkdir()
    else:
        path.write_text("root:x:0:0:root:/root:/bin/sh\n")
    result = trellis("ca", "entries", "list", "--socket", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"trellis: error: {path} is not a socket (give the path ca serve --admin-socket names)\n"
    )
