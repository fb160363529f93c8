"""Workload attestation: who is calling, expressed as selectors, and which entries match.

Theory of operation. The Workload API never takes a workload's word for who it is. The
kernel tells the agent the caller's pid, uid and gid (SO_PEERCRED, see ``peercred.py``);
from the pid the agent reads the executable path and the cgroup in ``/proc``; from the
cgroup, on Kubernetes, the pod UID, and from the pod (``k8s.py``) its namespace, service
account, labels and node. Each fact becomes a ``Selector`` such as ``unix:uid:1000`` or
``k8s:ns:default`` (``ca.server.entries.Selector``, shared with the CA). A registration
entry matches a caller when *every* selector of the entry is among the caller's selectors
(SPIRE's rule: an entry is a conjunction; a caller may carry more facts than any one entry
mentions). Only the kernel-reported gid attests as ``unix:gid``: supplementary groups are
deliberately not selectors, so an entry for a group cannot leak to every member of it.

Everything here except ``UnixAttestor`` is pure: selectors in, entries out. Entry
matching sits behind the small ``EntryMatcher`` interface the Workload API depends on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ca.server.entries import RegistrationEntry, Selector

__all__ = [
    "AttestationError",
    "AttestationPending",
    "EntryMatcher",
    "PeerCredentials",
    "Selector",
    "SelectorPlugin",
    "SubsetMatcher",
    "UnixAttestor",
    "WorkloadAttestor",
    "WorkloadAttributes",
]


class AttestationError(Exception):
    """The caller cannot be attested (it exited, or its pid was reused since it connected)."""


class AttestationPending(AttestationError):
    """Facts about the caller are not known yet (a pod the watch has not delivered): retry."""


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """What the kernel says about the process at the other end of a Unix socket."""

    pid: int
    uid: int
    gid: int
    # /proc/<pid>/stat field 22 at connect time: detects a pid reused by another process.
    start_time: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadAttributes:
    """Everything attested about one caller; ``selectors`` is what entries are matched to."""

    credentials: PeerCredentials
    exe_path: str | None = None
    cgroups: tuple[str, ...] = ()
    extra: frozenset[Selector] = field(default_factory=frozenset)

    def selectors(self) -> frozenset[Selector]:
        c = self.credentials
        found = {Selector("unix", "uid", str(c.uid)), Selector("unix", "gid", str(c.gid))}
        if self.exe_path is not None:
            found.add(Selector("unix", "path", self.exe_path))
        return frozenset(found) | self.extra


class EntryMatcher(Protocol):
    def match(
        self, entries: Iterable[RegistrationEntry], selectors: frozenset[Selector]
    ) -> list[RegistrationEntry]: ...


class SubsetMatcher:
    """An entry matches when all its selectors are among the caller's (SPIRE semantics).

    An entry without selectors never matches: it would otherwise hand its identity to
    every process on the node.
    """

    def match(
        self, entries: Iterable[RegistrationEntry], selectors: frozenset[Selector]
    ) -> list[RegistrationEntry]:
        matched = [e for e in entries if e.selectors and e.matches(selectors)]
        return sorted(matched, key=lambda e: (str(e.spiffe_id), e.entry_id))


def _read_start_time(stat: str) -> int:
    # The comm field (2) may contain spaces and parentheses; fields resume after the last ')'.
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[19])  # field 22 overall: starttime, in clock ticks since boot


class UnixAttestor:
    """Reads a caller's executable, cgroups and names from ``/proc`` (``proc_root`` in tests)."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self._proc = proc_root

    def start_time(self, pid: int) -> int | None:
        try:
            return _read_start_time((self._proc / str(pid) / "stat").read_text())
        except (OSError, ValueError, IndexError):
            return None

    def attest(self, credentials: PeerCredentials) -> WorkloadAttributes:
        proc = self._proc / str(credentials.pid)
        exe: str | None
        try:
            exe = str((proc / "exe").readlink())
        except OSError:
            exe = None  # kernel threads, or a process of another user without CAP_SYS_PTRACE
        try:
            cgroups = tuple(line for line in (proc / "cgroup").read_text().splitlines() if line)
        except OSError as exc:
            raise AttestationError(f"pid {credentials.pid} is gone: {exc.strerror}") from exc
        # Read the start time last: if it still matches, everything read above belongs to
        # the process that connected, not to a newcomer that inherited its pid.
        started = credentials.start_time
        if started is not None and self.start_time(credentials.pid) != started:
            raise AttestationError(f"pid {credentials.pid} was reused since it connected")
        return WorkloadAttributes(
            credentials,
            exe_path=exe,
            cgroups=cgroups,
        )


class SelectorPlugin(Protocol):
    """Adds selectors from another source (e.g. the caller's Kubernetes pod)."""

    def selectors(self, attributes: WorkloadAttributes) -> frozenset[Selector]: ...


class WorkloadAttestor:
    """Unix attestation from /proc, plus whatever the plugins add."""

    def __init__(
        self, unix: UnixAttestor | None = None, plugins: Iterable[SelectorPlugin] = ()
    ) -> None:
        self.unix = unix or UnixAttestor()
        self.plugins = tuple(plugins)

    def attest(self, credentials: PeerCredentials) -> WorkloadAttributes:
        attributes = self.unix.attest(credentials)
        extra: frozenset[Selector] = frozenset()
        for plugin in self.plugins:
            extra |= plugin.selectors(attributes)
        if not extra:
            return attributes
        return WorkloadAttributes(
            attributes.credentials, attributes.exe_path, attributes.cgroups, extra
        )
