"""The Workload API front's private gRPC socket must fit in sun_path whatever $TMPDIR is."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from ca.agent.peercred import UdsFront


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
        front.internal_path.parent.rmdir()


def test_a_short_tmpdir_is_used_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(short))
    monkeypatch.setattr(tempfile, "tempdir", None)
    front = UdsFront(tmp_path / "agent.sock")
    try:
        assert front.internal_path.parent.parent == short
    finally:
        front.internal_path.parent.rmdir()
        short.rmdir()
