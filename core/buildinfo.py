"""What build is running: ``trellis --version`` and the ``trellis_build_info`` gauge.

The version is the installed distribution's (``pyproject.toml``); the source revision is
known when the code runs from a git checkout (read from ``.git`` directly: no ``git``
binary, no subprocess at start-up) or when pip recorded the commit it installed from
(``direct_url.json``, PEP 610). Every process exports ``trellis_build_info{version,
revision} 1`` so that a dashboard or an alert can tell which build each target runs
(the ``*_build_info`` convention of Prometheus's own exporters).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["DISTRIBUTION", "describe", "register_build_info", "revision", "version"]

DISTRIBUTION = "trellis-mesh"
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
_SHA = re.compile(r"[0-9a-f]{40}")
_SHORT = 12


@functools.cache
def version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"  # run from a source tree that was never installed


@functools.cache
def revision() -> str | None:
    """The commit this code was built from (12 hex digits), or None when nothing says."""
    commit = _installed_commit() or _checkout_commit(_SOURCE_ROOT)
    return commit[:_SHORT] if commit else None


def describe() -> str:
    """``trellis 0.1.0 (revision 3a02da0c1b2e)``: the ``--version`` line."""
    rev = revision()
    return f"trellis {version()}" + (f" (revision {rev})" if rev else "")


def register_build_info(registry: CollectorRegistry) -> None:
    """Add ``trellis_build_info{version, revision} 1`` to a process's metrics registry."""
    from prometheus_client import Gauge

    gauge = Gauge(
        "trellis_build_info",
        "Always 1; the labels say which Trellis build this process runs.",
        ["version", "revision"],
        registry=registry,
    )
    gauge.labels(version=version(), revision=revision() or "unknown").set(1)


def _installed_commit() -> str | None:
    """PEP 610: pip records the VCS commit of a ``pip install git+...``."""
    try:
        text = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    try:
        commit = json.loads(text).get("vcs_info", {}).get("commit_id")
    except (ValueError, AttributeError):
        return None
    return commit if isinstance(commit, str) and _SHA.fullmatch(commit) else None


def _checkout_commit(root: Path) -> str | None:
    """HEAD of the git checkout at ``root``, following a branch ref (loose or packed) and a
    worktree's ``gitdir:`` file; None for anything unexpected rather than a guess."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            pointer = git.read_text().strip()
            if not pointer.startswith("gitdir:"):
                return None
            git = (root / pointer.removeprefix("gitdir:").strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if _SHA.fullmatch(head):
            return head  # a detached HEAD
        if not head.startswith("ref: "):
            return None
        ref = head.removeprefix("ref: ")
        common = git
        if (git / "commondir").is_file():  # a worktree keeps branches in the main .git
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            loose = base / ref
            if loose.is_file():
                value = loose.read_text().strip()
                return value if _SHA.fullmatch(value) else None
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                sha, _, name = line.partition(" ")
                if name == ref and _SHA.fullmatch(sha):
                    return sha
    except (OSError, UnicodeDecodeError):
        return None
    return None
