"""Each workload of ``trellis up`` under a uid of its own, when ``trellis up`` runs as root.

Why. The agent attests a caller by uid, gid and executable path (``ca/agent/attestation.py``).
Were every workload the same user, the executable path would be all that tells them apart,
and ``unix:path`` alone is the selector an exec can borrow: a process that connects, forks
and execs the entitled binary before the agent reads ``/proc`` is attested as that binary
(the race ``attestation.py`` describes). With a uid per workload each entry names
``unix:uid`` *and* ``unix:path``, and a process of one workload cannot pass for another
whatever it execs: SO_PEERCRED reports the uid of the process when it connected.

A workload is one demo service: its app (the echo server, the load generator) and its
sidecar share its uid, as the containers of one pod share the pod's identity; the sidecar's
own interpreter copy still tells it from its app. The CA server and the agent keep
``trellis up``'s uid: they hold the keys.

Which uids. Bare numbers, no user database entries: setuid(2) needs none. They come from a
range far above login and system users (``login.defs`` UID_MAX is 60000, systemd's dynamic
users end at 65519 and container ranges are usually 100000-2^31, so a collision is unlikely
and a uid some user database knows is skipped), one block per ``trellis up`` process,
placed by its pid, so two meshes running at once never share a uid.

What they need. The interpreter, its standard library and the environment's packages must
be readable by another uid. The running interpreter may not be (a pyenv build under a
private ``/root`` is not), so a system interpreter of the same version is tried next; each
candidate is tried for real, as the uid, before it is used. If none will do, ``trellis up``
says why in its status and runs every workload as itself, as it does when not root.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["UID_BASE", "Isolation", "allocate_uids", "hand_over", "plan_isolation"]

UID_BASE = 1_600_000_000
# Uids per trellis up process: the three workloads, plus room for numbers skipped. pid_max
# is at most 2^22, so UID_BASE + 2^22 * 8 stays below 2^31 (signed-uid trouble in tools).
_BLOCK = 8
_PROBE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Isolation:
    """Who runs each workload, from which interpreter, and the status line that says so."""

    interpreter: Path  # what the workloads' interpreter copies are copied from
    note: str
    uids: Mapping[str, int] = field(default_factory=dict)  # empty: all run as trellis up

    def uid(self, name: str) -> int | None:
        """The workload's own uid; None: it runs as ``trellis up`` itself."""
        return self.uids.get(name)

    def entry_uid(self, name: str) -> int:
        """What its registration entry's ``unix:uid`` selector names."""
        return self.uids.get(name, os.getuid())


def _known(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        try:
            grp.getgrgid(uid)  # the gid is the same number
        except KeyError:
            return False
    return True


def allocate_uids(names: Sequence[str], pid: int | None = None) -> dict[str, int]:
    """One unused uid per name, from this process's block of the high range."""
    start = UID_BASE + (os.getpid() if pid is None else pid) * _BLOCK
    candidates = (uid for uid in range(start, start + _BLOCK) if not _known(uid))
    uids: dict[str, int] = {}
    for name in names:
        uid = next(candidates, None)
        if uid is None:
            raise RuntimeError(f"no unused uid in {start}..{start + _BLOCK - 1}")
        uids[name] = uid
    return uids


def _candidates(base: Path) -> list[Path]:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [base]
    for directory in ("/usr/bin", "/usr/local/bin"):
        path = Path(directory) / version
        if path.is_file() and path.resolve() != base:
            found.append(path.resolve())
    return found


def _runs_as(interpreter: Path, uid: int) -> str | None:
    """None when ``interpreter`` imports Trellis from this environment as ``uid``; else why not."""
    purelib = sysconfig.get_paths()["purelib"]
    # As the workload copies will see it: no system site-packages (-S; their pyvenv.cfg
    # says so), and this environment's as a site directory, not PYTHONPATH, so that its
    # .pth files (an editable install's finder among them) are read.
    code = f"import site; site.addsitedir({purelib!r}); import trellis.cli, sidecar.cli"
    try:
        result = subprocess.run(
            [str(interpreter), "-S", "-c", code],
            user=uid,
            group=uid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT,
            cwd="/",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return str(getattr(exc, "strerror", None) or exc)
    if result.returncode == 0:
        return None
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def _closed_to_others(directory: Path) -> Path | None:
    """The first directory on the way to ``directory`` another uid cannot enter, if any."""
    for path in (directory, *directory.parents):
        try:
            enterable = bool(path.stat().st_mode & stat.S_IXOTH)
        except OSError:
            enterable = False
        if not enterable:
            return path
    return None


def plan_isolation(names: Sequence[str], base: Path, run_dir: Path) -> Isolation:
    """A uid per workload when root and an interpreter for them exists; else say why not.

    ``run_dir``'s parent must be enterable by other uids (the workloads reach the agent's
    socket and their directories through it); ``run_dir`` itself is made so by the caller.
    """
    me = os.getuid()
    shared = f"every workload runs as uid {me}; the agent tells them apart by unix:path alone"
    if os.geteuid() != 0:
        return Isolation(base, f"not root: {shared}")
    closed = _closed_to_others(run_dir.parent)
    if closed is not None:
        return Isolation(base, f"{shared} ({closed} is closed to other users)")
    uids = allocate_uids(names)
    probe_uid = next(iter(uids.values()))
    problems = []
    for candidate in _candidates(base):
        problem = _runs_as(candidate, probe_uid)
        if problem is None:
            listed = ", ".join(f"{name} {uid}" for name, uid in uids.items())
            return Isolation(
                candidate,
                f"each workload under its own uid ({listed}); entries select unix:uid and"
                " unix:path",
                uids,
            )
        problems.append(f"{candidate} as uid {probe_uid}: {problem}")
    return Isolation(base, f"{shared} (no interpreter another uid can run: {'; '.join(problems)})")


def hand_over(paths: Iterable[Path], uid: int) -> None:
    """Make ``paths`` (and all below them) the workload's: owner and group ``uid``."""
    for top in paths:
        os.chown(top, uid, uid, follow_symlinks=False)
        if top.is_symlink() or not top.is_dir():
            continue
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                os.chown(Path(root) / name, uid, uid, follow_symlinks=False)
