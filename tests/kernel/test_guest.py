"""The kTLS suite on a real Linux kernel: boots the QEMU guest (`guest_vm.py`) once and
runs ``tests/kernel/guest`` inside it with this machine's venv interpreter. Any failure
inside fails this test with the guest's pytest output."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .guest_vm import REPO, run


def test_the_ktls_suite_passes_inside_a_linux_6_1_guest(guest_kernel: Path) -> None:
    python = shlex.quote(str(Path(sys.executable)))
    suite = shlex.quote(str(Path(__file__).resolve().parent.relative_to(REPO) / "guest"))
    result = run(
        f"uname -r; {python} -m pytest -q -p no:cacheprovider {suite}", folder=guest_kernel
    )
    assert result.status == 0, f"the guest suite failed (exit {result.status}):\n{result.output}"
    first_line = result.output.splitlines()[0]
    assert first_line.startswith("6.1."), first_line  # the kernel these tests are about
    assert " passed" in result.output and "skipped" not in result.output, result.output
