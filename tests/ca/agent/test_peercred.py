"""The pidfd the front keeps for each caller, on this kernel and on older ones.

Kernels before 6.5 have no SO_PEERPIDFD and those before 5.3 no pidfds at all; neither can
run here, so those two are a socket whose option is refused and a ``pidfd_open`` that
raises ENOSYS, as such kernels answer.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ca.agent.peercred import PeerProcess


class _OldKernelSocket:
    def getsockopt(self, level: int, option: int) -> int:
        raise OSError(errno.ENOPROTOOPT, "Protocol not available")


def test_the_pidfd_of_a_connected_peer_names_the_process_that_connected() -> None:
    server, client = socket.socketpair(socket.AF_UNIX)
    with server, client:
        process = PeerProcess.of(server, os.getpid())  # SO_PEERPIDFD: this very process
        assert process is not None and process.running()
        fd = process._fd
        fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text()
        assert f"Pid:\t{os.getpid()}\n" in fdinfo
        process.close()
        assert not process.running()  # a closed handle never vouches for anyone


def test_without_so_peerpidfd_the_pid_is_opened_and_an_exit_is_seen() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    process = PeerProcess.of(_OldKernelSocket(), child.pid)  # type: ignore[arg-type]
    assert process is not None and process.running()
    child.kill()
    child.wait(10)  # reaped: the pid may even be reused, the pidfd still names the dead one
    assert not process.running()
    process.close()


def test_without_pidfds_at_all_there_is_no_handle_and_the_start_time_must_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def enosys(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", enosys)
    assert PeerProcess.of(_OldKernelSocket(), os.getpid()) is None  # type: ignore[arg-type]


def test_a_peer_already_gone_is_an_error_not_a_handle() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(10)
    with pytest.raises(ProcessLookupError):
        PeerProcess.of(_OldKernelSocket(), child.pid)  # type: ignore[arg-type]
