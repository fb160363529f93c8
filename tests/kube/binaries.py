"""Build a real Kubernetes control plane (kube-apiserver, etcd, kubectl) once per machine.

Nothing is downloaded but Go modules: the sources come from the Go module proxy, pinned by
the two small modules of ours under ``go/`` (``apiserver/`` requires ``k8s.io/kubernetes``
with one ``replace`` per staging module; ``etcd/`` has ``go.etcd.io/etcd/server/v3`` as a
``tool``). The binaries go to ``${XDG_CACHE_HOME:-~/.cache}/trellis/kube-v1.37.2/``,
keyed by the release, and a stamp there records a hash of the two modules and the Go
version, so a second ``make test`` reuses them and a changed go.sum rebuilds.

A cold build compiles about 2,000 packages: many minutes on two shared cores, so it runs
under ``nice -n 10`` and prints a progress line every half minute. A file lock makes
concurrent builders wait for one build; the binaries appear by an atomic rename.

The Go toolchain is found as for the interop peers (``tests.interop.go_peers``). Run as
``python -m tests.kube.binaries`` (``make kube`` does); whatever is missing is one line
(``KubeUnavailable``), exit status 1.
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

KUBERNETES_VERSION = "v1.37.2"
ETCD_VERSION = "v3.7.3"
MODULES = Path(__file__).resolve().parent / "go"
PROGRAMS = ("kube-apiserver", "kubectl", "etcd")
BUILD_TIMEOUT = 5400.0  # a cold build on two busy cores: tens of minutes, not hours
PROGRESS_EVERY = 30.0  # seconds

# What hack/lib/version.sh stamps into a release build, so `kubectl version` and the
# API server's /version report the release rather than v0.0.0-master.
_MAJOR, _MINOR, _ = KUBERNETES_VERSION.removeprefix("v").split(".")
_LDFLAGS = " ".join(
    f"-X {package}.{name}={value}"
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
    for name, value in (
        ("gitVersion", KUBERNETES_VERSION),
        ("gitMajor", _MAJOR),
        ("gitMinor", _MINOR),
        ("gitTreeState", "clean"),
    )
)


class KubeUnavailable(RuntimeError):
    """The control plane cannot be built here; the message is one line saying why."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trellis" / f"kube-{KUBERNETES_VERSION}"


def modules_hash(version: str) -> str:
    digest = hashlib.sha256(f"{version}\0{_LDFLAGS}".encode())
    for path in sorted(MODULES.rglob("go.*")):
        digest.update(str(path.relative_to(MODULES)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cached(folder: Path, stamp: str) -> bool:
    try:
        recorded = (folder / "stamp").read_text().strip()
    except OSError:
        return False
    return recorded == stamp and all((folder / name).is_file() for name in PROGRAMS)


def _go_build(go: str, module: str, out: str, packages: list[str], progress: bool) -> None:
    """``go build -v`` with its package list turned into a progress line every 30 s."""
    what = f"go build in tests/kube/go/{module}"
    command = ["nice", "-n", "10", go, "build", "-v", "-trimpath"]
    command += ["-ldflags", _LDFLAGS, "-o", out, *packages]
    env = {**os.environ, "CGO_ENABLED": "0"}
    started = time.monotonic()
    last_report = started
    compiled = 0
    tail: list[str] = []
    with subprocess.Popen(
        command,
        cwd=MODULES / module,
        env=env,
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
                raise KubeUnavailable(f"{what} took over {BUILD_TIMEOUT:.0f}s")
            if progress and now - last_report >= PROGRESS_EVERY:
                print(
                    f"  {module}: {compiled} packages after {now - started:.0f}s "
                    f"(last: {line.strip()})",
                    flush=True,
                )
                last_report = now
        status = proc.wait()
    if status != 0:
        errors = [line for line in tail if line.strip() and not line.startswith("k8s.io/")]
        raise KubeUnavailable(f"{what} failed: {(errors or tail or ['?'])[-1].strip()}")
    if progress:
        print(f"  {module}: done in {time.monotonic() - started:.0f}s", flush=True)


def build(progress: bool = False) -> Path:
    """The folder holding kube-apiserver, kubectl and etcd (built now if missing)."""
    try:
        go = go_binary()
        version = go_version(go)
    except GoPeersUnavailable as exc:
        raise KubeUnavailable(str(exc)) from None
    target = cache_dir()
    stamp = modules_hash(version)
    if cached(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".kube-{KUBERNETES_VERSION}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if cached(target, stamp):
            return target  # another process built it while we waited
        if progress:
            print(
                f"building kube-apiserver and kubectl {KUBERNETES_VERSION} and etcd "
                f"{ETCD_VERSION} with {version} into {target} (cold: tens of minutes)",
                flush=True,
            )
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            _go_build(go, "etcd", str(staging / "etcd"), ["go.etcd.io/etcd/server/v3"], progress)
            _go_build(
                go,
                "apiserver",
                str(staging) + os.sep,
                ["k8s.io/kubernetes/cmd/kube-apiserver", "k8s.io/kubernetes/cmd/kubectl"],
                progress,
            )
            (staging / "stamp").write_text(stamp + "\n")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str]) -> int:
    del argv
    try:
        folder = build(progress=True)
    except KubeUnavailable as exc:
        print(f"Kubernetes control plane: {exc}", file=sys.stderr)
        return 1
    print(f"kube-apiserver, kubectl and etcd ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
