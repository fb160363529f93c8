"""Workload attestation: who is calling, expressed as selectors, and which entries match.

Theory of operation. The Workload API never takes a workload's word for who it is. The
kernel tells the agent the caller's pid, uid and gid (SO_PEERCRED, see ``peercred.py``);
from the pid the agent reads the executable path and the cgroup in ``/proc``; from the
cgroup, on Kubernetes, the pod UID, and from the pod (``k8s.py``) its namespace, service
account, labels and node. Each fact becomes a ``Selector`` such as ``unix:uid:1000`` or
``k8s:ns:default`` (``ca.entries.Selector``, shared with the CA). A registration
entry matches a caller when *every* selector of the entry is among the caller's selectors
(SPIRE's rule: an entry is a conjunction; a caller may carry more facts than any one entry
mentions). Only the kernel-reported gid attests as ``unix:gid``: supplementary groups are
deliberately not selectors, so an entry for a group cannot leak to every member of it.

Bound to the connection, not to the pid. What a caller *is* gets fixed when the agent
accepts its connection (``UnixAttestor.snapshot``): the executable's path and its file
identity (``st_dev``, ``st_ino`` of ``/proc/<pid>/exe``), and the start time, beside a pidfd
for the process that connected (``peercred.PeerProcess``). Every call on that connection is
then checked against the snapshot (``UnixAttestor.verify``): the process must still run
(the pidfd: an exited process, even a zombie whose pid /proc still shows, or a new process
that reused the pid, fails) and still run the same file. Without this, a process could
connect, fork, and exec a binary an entry names by ``unix:path``; the child, holding the
inherited connection, would be attested as that binary, because SO_PEERCRED keeps naming
the parent's pid and ``/proc/<pid>/exe`` follows the exec. Now the exec changes the file
identity and the call is PERMISSION_DENIED. A fork alone changes nothing: a pre-fork server
whose workers share the connection keeps its identity while the process that connected
runs its program.

The race that remains, and how SPIRE states its own. The snapshot is taken when the agent
accepts, which is after the kernel completed ``connect()``: a process that connects and
execs the entitled binary *before* the agent reads ``/proc`` is attested as that binary,
and a child holding the connection would be served. Nothing the agent can read tells an
exec from the original program (the start time and pid survive ``execve``), so the window
is narrowed, not closed: the kernel gives no record of "the program at connect time". The
remedy is to never make ``unix:path`` the only selector: an entry that also names the uid
(``trellis up`` gives each workload its own) cannot be reached by another user's process
whatever it execs, and a setuid exec does not change the uid SO_PEERCRED recorded at
connect. SPIRE's tracker promises exit detection in the same terms (its
``pkg/common/peertracker`` package: after reading a caller's ``/proc``, ``IsAlive`` confirms
that the caller has not exited and its pid was not reused); what the process runs is read
there when each call is attested, so an exec is not something it claims to detect.

Everything here except ``UnixAttestor`` is pure: selectors in, entries out. Entry
matching sits behind the small ``EntryMatcher`` interface the Workload API depends on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from ca.entries import RegistrationEntry, Selector

__all__ = [
    "AttestationError",
    "AttestationPending",
    "EntryMatcher",
    "Executable",
    "LiveProcess",
    "PeerCredentials",
    "Selector",
    "SelectorPlugin",
    "SubsetMatcher",
    "UnixAttestor",
    "WorkloadAttestor",
    "WorkloadAttributes",
    "process_start_time",
]


class AttestationError(Exception):
    """The caller cannot be attested (it exited, or its pid was reused since it connected)."""


class AttestationPending(AttestationError):
    """Facts about the caller are not known yet (a pod the watch has not delivered): retry."""


class LiveProcess(Protocol):
    """A handle on one process (a pidfd): whether *that* process still runs."""

    def running(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Executable:
    """The program a process ran when the agent accepted its connection."""

    path: str
    # The file itself: a process that execs another file (or the same path after the
    # file was replaced) shows another (device, inode) through /proc/<pid>/exe.
    device: int
    inode: int


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """What the kernel says about the process at the other end of a Unix socket, and what
    the agent read of it when it accepted the connection."""

    pid: int
    uid: int
    gid: int
    # /proc/<pid>/stat field 22 at accept time: detects a pid reused by another process.
    start_time: int | None = None
    # The executable at accept time; None when unreadable or never read: then the caller
    # has no ``unix:path`` selector at all (fail closed: never a path read later).
    executable: Executable | None = None
    process: LiveProcess | None = field(default=None, compare=False, repr=False)


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


def process_start_time(pid: int, proc_root: Path = Path("/proc")) -> int | None:
    """Start time of ``pid`` (clock ticks since boot), None if there is no such process."""
    try:
        return _read_start_time((proc_root / str(pid) / "stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


class UnixAttestor:
    """Reads a caller's executable, cgroups and names from ``/proc`` (``proc_root`` in tests)."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self._proc = proc_root

    def start_time(self, pid: int) -> int | None:
        return process_start_time(pid, self._proc)

    def _executable(self, pid: int) -> Executable | None:
        exe = self._proc / str(pid) / "exe"
        try:
            before = exe.stat()  # follows the link to the file the process runs
            path = str(exe.readlink())
            after = exe.stat()
        except OSError:
            return None  # exited, a kernel thread, or another user's without CAP_SYS_PTRACE
        if (before.st_dev, before.st_ino) != (after.st_dev, after.st_ino):
            raise AttestationError(f"pid {pid} executed another program while being attested")
        return Executable(path, after.st_dev, after.st_ino)

    def snapshot(self, credentials: PeerCredentials) -> PeerCredentials:
        """At accept time: the caller's executable and start time, bound to the connection."""
        pid = credentials.pid
        executable = self._executable(pid)
        started = self.start_time(pid)
        # Checked last: if the process that connected still runs, what was read above is
        # its, not a newcomer's that reused the pid (SO_PEERPIDFD names the very process).
        process = credentials.process
        if started is None or (process is not None and not process.running()):
            raise AttestationError(f"pid {pid} exited before it could be attested")
        return replace(credentials, start_time=started, executable=executable)

    def verify(self, credentials: PeerCredentials) -> None:
        """On every call: the caller is still the process, and the program, that connected."""
        pid = credentials.pid
        connected_as = credentials.executable
        if connected_as is not None:
            exe = self._proc / str(pid) / "exe"
            try:
                now = exe.stat()  # the file's identity is enough; its path only for the log
            except OSError:
                raise AttestationError(f"pid {pid} is gone (or no longer readable)") from None
            if (now.st_dev, now.st_ino) != (connected_as.device, connected_as.inode):
                try:
                    running = str(exe.readlink())
                except OSError:
                    running = "another program"
                raise AttestationError(
                    f"pid {pid} runs {running}, not {connected_as.path} it connected as"
                    " (it executed another program since)"
                )
        started = credentials.start_time
        if started is not None and self.start_time(pid) != started:
            raise AttestationError(f"pid {pid} was reused since it connected")
        # Last, as in ``snapshot``: the reads above were of the process that connected.
        process = credentials.process
        if process is not None and not process.running():
            raise AttestationError(f"pid {pid} has exited since it connected")

    def attest(self, credentials: PeerCredentials) -> WorkloadAttributes:
        proc = self._proc / str(credentials.pid)
        try:
            cgroups = tuple(line for line in (proc / "cgroup").read_text().splitlines() if line)
        except OSError as exc:
            raise AttestationError(f"pid {credentials.pid} is gone: {exc.strerror}") from exc
        self.verify(credentials)
        executable = credentials.executable
        return WorkloadAttributes(
            credentials,
            exe_path=executable.path if executable is not None else None,
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

    def verify(self, credentials: PeerCredentials) -> None:
        """Raises ``AttestationError`` unless the caller still is what connected."""
        self.unix.verify(credentials)

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
