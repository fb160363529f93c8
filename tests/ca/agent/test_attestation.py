"""Workload attestation: /proc facts → selectors → matching entries (SPIRE's subset rule)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from ca.agent.attestation import (
    AttestationError,
    PeerCredentials,
    SubsetMatcher,
    UnixAttestor,
    WorkloadAttestor,
    WorkloadAttributes,
)
from ca.entries import Selector, parse_selector
from tests.ca.agent.conftest import entry


def _selectors(*texts: str) -> frozenset[Selector]:
    return frozenset(parse_selector(t) for t in texts)


def test_a_caller_is_described_by_its_uid_gid_and_executable() -> None:
    attrs = WorkloadAttributes(PeerCredentials(10, 1000, 100), exe_path="/usr/bin/app")
    assert attrs.selectors() == _selectors(
        "unix:uid:1000", "unix:gid:100", "unix:path:/usr/bin/app"
    )


def test_an_entry_matches_only_when_the_caller_has_all_its_selectors() -> None:
    web = entry(selectors=["unix:uid:1000", "unix:path:/usr/bin/web"], entry_id="web")
    any_1000 = entry("spiffe://example.org/any", ["unix:uid:1000"], entry_id="any")
    caller = _selectors("unix:uid:1000", "unix:gid:100", "unix:path:/usr/bin/other")
    assert [e.entry_id for e in SubsetMatcher().match([web, any_1000], caller)] == ["any"]
    caller_web = caller - _selectors("unix:path:/usr/bin/other") | _selectors(
        "unix:path:/usr/bin/web"
    )
    matched = SubsetMatcher().match([web, any_1000], caller_web)
    assert sorted(e.entry_id for e in matched) == ["any", "web"]


def test_an_unregistered_uid_matches_nothing() -> None:
    web = entry(selectors=["unix:uid:1000"])
    assert SubsetMatcher().match([web], _selectors("unix:uid:1001", "unix:gid:1000")) == []


def test_the_real_proc_describes_this_very_process() -> None:
    attestor = UnixAttestor()
    me = attestor.snapshot(PeerCredentials(os.getpid(), os.getuid(), os.getgid()))
    assert me.start_time == attestor.start_time(os.getpid())
    attrs = attestor.attest(me)
    assert attrs.exe_path == os.path.realpath(f"/proc/{os.getpid()}/exe")
    assert attrs.cgroups  # every Linux process is in at least one cgroup


def test_a_caller_never_snapshot_at_accept_has_no_path_selector(tmp_path: Path) -> None:
    # Fail closed: the path is only ever the one read when the connection was accepted.
    _fake_proc(tmp_path, 4242, 777, "0::/\n")
    attrs = UnixAttestor(tmp_path).attest(PeerCredentials(4242, 1000, 1000, start_time=777))
    assert attrs.exe_path is None
    assert not any(s.name == "path" for s in attrs.selectors())


def _fake_proc(root: Path, pid: int, start_time: int, cgroup: str) -> None:
    proc = root / str(pid)
    proc.mkdir(parents=True)
    # Field 2 (comm) may hold spaces and parentheses; parsing must resume after the last ')'.
    fields = ["S"] + ["0"] * 18 + [str(start_time)] + ["0"] * 30
    (proc / "stat").write_text(f"{pid} (evil) (name) " + " ".join(fields) + "\n")
    (proc / "cgroup").write_text(cgroup)
    (proc / "exe").symlink_to("/usr/bin/true")


def test_a_pid_reused_since_connecting_is_refused(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 4242, 777, "0::/user.slice\n")
    attestor = UnixAttestor(tmp_path)
    assert attestor.start_time(4242) == 777
    connected = attestor.snapshot(PeerCredentials(4242, 1000, 1000))
    ok = attestor.attest(connected)
    assert ok.exe_path == "/usr/bin/true"
    with pytest.raises(AttestationError, match="reused"):
        attestor.attest(replace(connected, start_time=778))


def test_a_caller_that_executed_another_program_since_it_connected_is_refused(
    tmp_path: Path,
) -> None:
    _fake_proc(tmp_path, 4242, 777, "0::/\n")
    attestor = UnixAttestor(tmp_path)
    connected = attestor.snapshot(PeerCredentials(4242, 1000, 1000))
    exe = tmp_path / "4242" / "exe"
    exe.unlink()
    exe.symlink_to("/usr/bin/false")  # what an exec does to /proc/<pid>/exe
    with pytest.raises(AttestationError, match="runs /usr/bin/false, not /usr/bin/true"):
        attestor.attest(connected)


def test_a_caller_whose_process_exited_is_refused_even_while_its_pid_lingers(
    tmp_path: Path,
) -> None:
    class Exited:
        def running(self) -> bool:
            return False

    _fake_proc(tmp_path, 4242, 777, "0::/\n")
    attestor = UnixAttestor(tmp_path)
    connected = attestor.snapshot(PeerCredentials(4242, 1000, 1000))
    with pytest.raises(AttestationError, match="exited since it connected"):
        attestor.attest(replace(connected, process=Exited()))
    with pytest.raises(AttestationError, match="exited before it could be attested"):
        attestor.snapshot(PeerCredentials(4242, 1000, 1000, process=Exited()))


def test_a_caller_that_exited_cannot_be_attested(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="gone"):
        UnixAttestor(tmp_path).attest(PeerCredentials(99999, 0, 0))


def test_plugins_add_their_selectors_to_the_unix_ones(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 7, 1, "0::/\n")

    class Fixed:
        def selectors(self, attributes: WorkloadAttributes) -> frozenset[Selector]:
            return _selectors("k8s:ns:shop")

    attrs = WorkloadAttestor(UnixAttestor(tmp_path), [Fixed()]).attest(PeerCredentials(7, 5, 6))
    assert _selectors("k8s:ns:shop", "unix:uid:5") <= attrs.selectors()
