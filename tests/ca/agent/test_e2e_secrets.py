"""The agent's secrets, with real processes (``trellis ca serve`` and ``trellis agent``):
the join token stays off the command line every local user can read, and the agent's own
key is encrypted at rest when a key passphrase is given."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_for

from .test_e2e_pyspiffe import REPO, Mesh, _make_ca_dir, _stop, write_web_entry

KEY_PASS = "agent key passphrase"
WARNING = "trellis: warning: --join-token puts the token on this process's command line"


@pytest.fixture
def stack(tmp_path: Path, short_dir: Path) -> Iterator[Mesh]:
    """A CA server that has minted a join token for node-a; no agent yet."""
    _make_ca_dir(tmp_path / "ca")
    write_web_entry(tmp_path / "entries.yaml")
    mesh = Mesh(tmp_path, short_dir / "agent.sock")
    mesh.start_ca(mint_token=True)
    try:
        yield mesh
    finally:
        mesh.stop()


def _attested(mesh: Mesh) -> None:
    """Wait until the agent has attested and kept its SVID in --data-dir."""
    agent = mesh.agent
    assert agent is not None

    def saved() -> bool:
        if agent.poll() is not None:
            raise AssertionError(f"agent exited: {_stop(agent)}")
        return (mesh.agent_data / "agent-svid.pem").exists()

    wait_for(saved, 40, "the agent's saved SVID")


def _command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.parametrize("token_via", ["env", "file"])
def test_a_join_token_from_the_environment_or_a_file_never_reaches_the_agents_command_line(
    stack: Mesh, token_via: str
) -> None:
    stack.token_via = token_via
    stack.start_agent()
    _attested(stack)
    assert stack.agent is not None
    assert stack.join_token.startswith("tjt_")
    assert stack.join_token not in _command_line(stack.agent.pid)
    logs = stack.stop_agent()
    assert WARNING not in logs and stack.join_token not in logs


def test_a_join_token_on_the_command_line_still_works_but_warns_that_ps_shows_it(
    stack: Mesh,
) -> None:
    stack.token_via = "argv"
    stack.start_agent()
    _attested(stack)
    assert stack.agent is not None
    assert stack.join_token in _command_line(stack.agent.pid)  # what the warning says
    warnings = [line for line in stack.stop_agent().splitlines() if "warning" in line]
    assert warnings == [
        f"{WARNING}, readable by every local user (ps); use --join-token-file or"
        " $TRELLIS_JOIN_TOKEN"
    ]


def _agent_refusal(mesh: Mesh, *extra: str, env: dict[str, str]) -> list[str]:
    """Run an agent that should refuse to start; its stderr lines."""
    result = subprocess.run(
        [sys.executable, "-m", "trellis", *mesh.agent_args(), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    return result.stderr.strip().splitlines()


def test_the_agent_key_is_encrypted_at_rest_when_asked_and_needs_its_passphrase_to_restart(
    stack: Mesh, tmp_path: Path
) -> None:
    stack.agent_env = {"TRELLIS_KEY_PASSPHRASE": KEY_PASS}
    stack.start_agent()
    _attested(stack)
    key = stack.agent_data / "agent-svid.key"
    assert key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    stack.stop_agent()

    # Without the passphrase, or with a wrong one: one line naming the key, no new attestation.
    assert _agent_refusal(stack, env={}) == [
        f"trellis: error: agent key {key} is encrypted: set TRELLIS_KEY_PASSPHRASE"
        " or pass --key-passphrase-file"
    ]
    wrong = tmp_path / "wrong"
    wrong.write_text("not the agent key passphrase\n")
    assert _agent_refusal(stack, "--key-passphrase-file", str(wrong), env={}) == [
        f"trellis: error: cannot decrypt agent key {key}: wrong passphrase or corrupt file"
    ]

    # With it (from a file this time), the agent restarts on its kept SVID: no join token.
    secret = tmp_path / "secret"
    secret.write_text(f"{KEY_PASS}\n")
    stack.agent_env = {}
    stack.agent_extra = ["--key-passphrase-file", str(secret)]
    stack.start_agent()
    assert stack.agent is not None and stack.agent.poll() is None
    logs = stack.stop_agent()
    assert "ignoring unreadable agent state" not in logs and KEY_PASS not in logs
