"""Build Helm v4 once per machine, as ``tests.kube.binaries`` builds the control plane.

Nothing is downloaded but Go modules: ``go/helm/`` is a small module of ours that has
``helm.sh/helm/v4/cmd/helm`` as a ``tool`` at v4.3.2, so go.sum pins every dependency. The
binary goes to ``${XDG_CACHE_HOME:-~/.cache}/trellis/helm-v4.3.2/``, keyed by the release,
and a stamp there records a hash of the module and the Go version, so a second
``make test`` reuses it and a changed go.sum rebuilds.

A cold build compiles a few hundred packages (minutes on two shared cores), so it runs
under ``nice -n 10`` and prints a progress line every half minute. A file lock makes
concurrent builders wait for one build; the binary appears by an atomic rename.

The Go toolchain is found as for the interop peers (``tests.interop.go_peers``). Run as
``python -m tests.charts.binaries`` (``make helm`` does); whatever is missing is one line
(``HelmUnavailable``), exit status 1.
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

from tests.interop.go_peers import GoPeersUnavailable, go_binary, go_version

HELM_VERSION = "v4.3.2"
MODULE = Path(__file__).resolve().parent / "go" / "helm"
BUILD_TIMEOUT = 2700.0  # a cold build on two busy cores: minutes, not an hour
PROGRESS_EVERY = 30.0  # seconds

# What Helm's own Makefile stamps in, so `helm version` reports the release, not "v4.3".
_LDFLAGS = f"-X helm.sh/helm/v4/internal/version.version={HELM_VERSION}"


class HelmUnavailable(RuntimeError):
    """Helm cannot be built here; the message is one line saying why."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trellis" / f"helm-{HELM_VERSION}"


def module_hash(version: str) -> str:
    digest = hashlib.sha256(f"{version}\0{_LDFLAGS}".encode())
    for name in ("go.mod", "go.sum"):
        digest.update(name.encode() + b"\0" + (MODULE / name).read_bytes())
    return digest.hexdigest()[:16]


def cached(folder: Path, stamp: str) -> bool:
    try:
        recorded = (folder / "stamp").read_text().strip()
    except OSError:
        return False
    return recorded == stamp and (folder / "helm").is_file()


def stamp_now() -> str:
    """The stamp a build with this machine's toolchain would record."""
    try:
        return module_hash(go_version(go_binary()))
    except GoPeersUnavailable as exc:
        raise HelmUnavailable(str(exc)) from None


def _go_build(go: str, out: Path, progress: bool) -> None:
    """``go build -v`` with its package list turned into a progress line every 30 s."""
    what = "go build in tests/charts/go/helm"
    command = ["nice", "-n", "10", go, "build", "-v", "-trimpath"]
    command += ["-ldflags", _LDFLAGS, "-o", str(out), "helm.sh/helm/v4/cmd/helm"]
    started = time.monotonic()
    last_report = started
    compiled = 0
    tail: list[str] = []
    with subprocess.Popen(
        command,
        cwd=MODULE,
        env={**os.environ, "CGO_ENABLED": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            compiled += 1
            tail = [*tail[-19:], line.rstrip()]
            now = time.monotonic()
            if now - started > BUILD_TIMEOUT:
                proc.kill()
                raise HelmUnavailable(f"{what} took over {BUILD_TIMEOUT:.0f}s")
            if progress and now - last_report >= PROGRESS_EVERY:
                print(
                    f"  helm: {compiled} packages after {now - started:.0f}s "
                    f"(last: {line.strip()})",
                    flush=True,
                )
                last_report = now
        status = proc.wait()
    if status != 0:
        # `go build -v` lists package paths; its errors are the lines with a colon.
        errors = [line for line in tail if ": " in line]
        raise HelmUnavailable(f"{what} failed: {(errors or tail or ['?'])[-1].strip()}")
    if progress:
        print(f"  helm: done in {time.monotonic() - started:.0f}s", flush=True)


def build(progress: bool = False) -> Path:
    """The path of the helm binary (built now if missing)."""
    try:
        go = go_binary()
        version = go_version(go)
    except GoPeersUnavailable as exc:
        raise HelmUnavailable(str(exc)) from None
    target = cache_dir()
    stamp = module_hash(version)
    if cached(target, stamp):
        return target / "helm"
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".helm-{HELM_VERSION}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if cached(target, stamp):
            return target / "helm"  # another process built it while we waited
        if progress:
            print(f"building helm {HELM_VERSION} with {version} into {target}", flush=True)
        staging = Path(tempfile.mkdtemp(prefix=".build-helm-", dir=target.parent))
        try:
            _go_build(go, staging / "helm", progress)
            (staging / "stamp").write_text(stamp + "\n")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target / "helm"


def main(argv: list[str]) -> int:
    del argv
    try:
        helm = build(progress=True)
    except HelmUnavailable as exc:
        print(f"Helm: {exc}", file=sys.stderr)
        return 1
    print(f"helm {HELM_VERSION} ready at {helm}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
