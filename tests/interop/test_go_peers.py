"""The Go peer programs themselves: bad input is one line saying why, never a stack or a
usage page, so a test that expects a refusal can check the reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import GoPeers


def run(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("program", ["workload", "spiffetls", "tlspeer"])
def test_each_go_peer_answers_an_unknown_flag_with_one_line(
    go_peers: GoPeers, program: str
) -> None:
    mode = {"workload": "x509", "spiffetls": "client", "tlspeer": "client"}[program]
    result = run(go_peers.folder / program, mode, "-no-such-flag")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"{program}: flag provided but not defined: -no-such-flag\n"


def test_tlspeer_names_the_svid_file_it_cannot_read(go_peers: GoPeers, tmp_path: Path) -> None:
    result = run(go_peers.tlspeer, "server", "-dir", str(tmp_path))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"tlspeer: load SVID: open {tmp_path}/svid.pem: "), line


def test_the_go_workload_names_a_missing_workload_api_socket(
    go_peers: GoPeers, tmp_path: Path
) -> None:
    socket = tmp_path / "absent.sock"
    result = run(go_peers.workload, "x509", "-addr", f"unix://{socket}", "-timeout", "3s")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("workload: FetchX509Context: Unavailable: "), line
    assert str(socket) in line
