"""The Workload API front's private directory: its socket fits in sun_path whatever
$TMPDIR is, and one left by a killed agent is removed by the next, never a live one's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from ca.agent.peercred import FRONT_DIR_PREFIX, UdsFront, remove_stale_front_dirs
from tests.ca.agent.conftest import LiveCa, entry, make_upstream, run, running_agent

REPO = Path(__file__).resolve().parents[3]


def test_a_deep_tmpdir_falls_back_to_tmp_so_the_internal_socket_can_bind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr(tempfile, "tempdir", None)  # forget the cached gettempdir()
    front = UdsFront(tmp_path / "agent.sock")
    try:
        assert front.internal_path.parent.parent == Path("/tmp")
        assert len(str(front.internal_path.parent / "c9999999").encode()) < 108
    finally:
        shutil.rmtree(front.internal_path.parent)


def test_a_short_tmpdir_is_used_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(short))
    monkeypatch.setattr(tempfile, "tempdir", None)
    front = UdsFront(tmp_path / "agent.sock")
    try:
        assert front.internal_path.parent.parent == short
    finally:
        shutil.rmtree(short)


# A real agent process's front: it prints its private directory, then waits to be killed.
_FRONT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ca.agent.peercred import UdsFront
    front = UdsFront(Path(sys.argv[1]))
    print(front.internal_path.parent, flush=True)
    time.sleep(60)
    """
)


def _front_process(tmpdir: Path, socket_path: Path) -> tuple[subprocess.Popen[str], Path]:
    process = subprocess.Popen(
        [sys.executable, "-c", _FRONT, str(socket_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={"TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)},
    )
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_the_directory_of_a_killed_agent_is_removed_at_start_and_a_live_ones_is_kept(
    live_ca: LiveCa, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed, killed_dir = _front_process(short_dir, short_dir / "killed.sock")
    live, live_dir = _front_process(short_dir, short_dir / "live.sock")
    try:
        killed.send_signal(signal.SIGKILL)  # no chance to clean up: its directory stays
        killed.wait(10)
        assert killed_dir.is_dir() and live_dir.is_dir()
        unowned = short_dir / f"{FRONT_DIR_PREFIX}older"  # no owner record: left alone
        unowned.mkdir()
        monkeypatch.setenv("TMPDIR", str(short_dir))
        monkeypatch.setattr(tempfile, "tempdir", None)

        async def main() -> Path:
            upstream = make_upstream(live_ca, [entry()])
            async with running_agent(upstream, short_dir, wait_synced=False) as agent:
                return agent.front.internal_path.parent

        own_dir = run(main())
        assert not killed_dir.exists()
        assert live_dir.is_dir() and unowned.is_dir()
        assert not own_dir.exists()  # removed by the agent itself when it stopped
    finally:
        live.kill()
        live.wait(10)
    assert remove_stale_front_dirs(short_dir) == [live_dir]
    assert sorted(p.name for p in short_dir.iterdir()) == [f"{FRONT_DIR_PREFIX}older"]


def test_a_pid_reused_by_another_process_does_not_keep_a_dead_agents_directory(
    short_dir: Path,
) -> None:
    stale = short_dir / f"{FRONT_DIR_PREFIX}reused"
    stale.mkdir()
    # A running process (this test's parent) holds the recorded pid, but it started at
    # another time than the recorded owner: the owner is gone.
    namespace = os.readlink("/proc/self/ns/pid")
    (stale / "owner").write_text(f"{os.getppid()} 1 {namespace}\n")
    assert remove_stale_front_dirs(short_dir) == [stale]
