"""``trellis svid fetch`` against a running agent, and ``trellis agent`` refusing bad input."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.ca.agent.conftest import WEB, LiveCa, entry, make_upstream, run, running_agent
from trellis.cli import main


def test_svid_fetch_prints_and_writes_the_svid_key_0600_and_bundle(
    live_ca: LiveCa, short_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"

    async def main_() -> int:
        async with running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent:
            argv = [
                "svid", "fetch", "--socket", str(agent.config.socket_path),
                "--write", str(out), "--json", "--audience", "db",
            ]  # fmt: skip
            return await asyncio.to_thread(main, argv)

    assert run(main_()) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["spiffe_id"] for s in report["svids"]] == [WEB]
    assert report["jwt_svids"][0]["spiffe_id"] == WEB
    assert stat.S_IMODE((out / "svid.key").stat().st_mode) == 0o600
    chain = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "svid.key").read_bytes(), None)
    assert key.public_key() == chain[0].public_key()
    assert len(x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())) == 1


def test_svid_fetch_without_an_agent_is_one_line_and_exit_1(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["svid", "fetch", "--socket", str(short_dir / "nothing.sock"), "--timeout", "1s"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("trellis: error: Workload API at unix:") and err.count("\n") == 1


def test_svid_fetch_finds_the_agent_through_spiffe_endpoint_socket(
    live_ca: LiveCa, short_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    async def main_() -> int:
        async with running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent:
            monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", f"unix://{agent.config.socket_path}")
            return await asyncio.to_thread(main, ["svid", "fetch"])

    assert run(main_()) == 0
    assert f"SPIFFE ID:       {WEB}" in capsys.readouterr().out


def test_the_agent_needs_a_ca_or_a_local_ca(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "--socket", "/tmp/unused.sock", "--admin", "off"]) == 1
    assert "--ca HOST:PORT" in capsys.readouterr().err


def test_the_agent_refuses_to_start_without_any_way_to_attest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    roots = tmp_path / "roots.pem"
    import datetime as dt

    from ca import RootAuthority, TrustDomain

    root = RootAuthority.create(TrustDomain("example.org"), now=dt.datetime.now(dt.UTC))
    roots.write_bytes(root.certificate.public_bytes(serialization.Encoding.PEM))
    argv = [
        "agent", "--ca", "127.0.0.1:1", "--trust-bundle", str(roots),
        "--data-dir", str(tmp_path / "empty"), "--admin", "off",
    ]  # fmt: skip
    assert main(argv) == 1
    assert "give --join-token-file (or $TRELLIS_JOIN_TOKEN) or --psat-token-file" in (
        capsys.readouterr().err
    )


def _agent_argv(tmp_path: Path) -> list[str]:
    import datetime as dt

    from ca import RootAuthority, TrustDomain

    roots = tmp_path / "roots.pem"
    root = RootAuthority.create(TrustDomain("example.org"), now=dt.datetime.now(dt.UTC))
    roots.write_bytes(root.certificate.public_bytes(serialization.Encoding.PEM))
    return [
        "agent", "--ca", "127.0.0.1:1", "--trust-bundle", str(roots),
        "--data-dir", str(tmp_path / "empty"), "--admin", "off",
    ]  # fmt: skip


def _agent_process(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """The agent as a process, bounded: an agent that accepted the token would retry the
    unreachable CA until the timeout ends the test."""
    return subprocess.run(
        [sys.executable, "-m", "trellis", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_agent_refuses_an_empty_join_token_file_in_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    result = _agent_process([*_agent_argv(tmp_path), "--join-token-file", str(empty)])
    assert result.returncode == 1
    assert result.stderr == f"trellis: error: join token file {empty} is empty\n"


def test_the_agent_takes_its_join_token_from_one_flag_only(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tjt_x\n")
    argv = [*_agent_argv(tmp_path), "--join-token-file", str(token), "--join-token", "tjt_y"]
    result = _agent_process(argv)
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
