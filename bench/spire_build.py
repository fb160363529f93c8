"""Build SPIRE v1.13.3 and the go-spiffe latency client from bench/spire/, once, into a cache.

    python3 bench/spire_build.py          # builds what is missing, prints the binaries as JSON

The Go module in ``bench/spire/`` pins spire-server and spire-agent as ``tool``
dependencies (``go get -tool github.com/spiffe/spire/cmd/spire-server@v1.13.3``: the module
proxy serves SPIRE without a version list, so it is required from a module of ours) and
holds ``cmd/svid-latency``, a small go-spiffe client. Binaries go to
``${XDG_CACHE_HOME:-~/.cache}/trellis/spire-v1.13.3/``, SPIRE's keyed by its version and the
Go toolchain, the client's also by a hash of its sources, so a second run builds nothing.

Builds run under ``nice -n 19`` with ``GOFLAGS=-p=1``: the machines' cores are shared, and
a SPIRE build (cgo for SQLite, some 600 packages) takes many minutes that way. Any piece
missing (go, a C compiler, the module proxy) ends the benchmark with one line saying so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SPIRE_VERSION = "v1.13.3"
MODULE = Path(__file__).resolve().parent / "spire"
CLIENT_PACKAGE = "./cmd/svid-latency"


class MissingPiece(SystemExit):
    """A benchmark cannot run: the message is the one line it prints."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{Path(sys.argv[0]).name}: {reason}")


@dataclass(frozen=True, slots=True)
class SpireBinaries:
    server: Path
    agent: Path
    client: Path
    go_version: str


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trellis" / f"spire-{SPIRE_VERSION}"


def progress(message: str) -> None:
    print(f"[spire build] {message}", file=sys.stderr, flush=True)


def go_version(go: str) -> str:
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise MissingPiece(f"`go env GOVERSION` failed: {out.stderr.strip() or 'no output'}")
    return out.stdout.strip()


def client_key() -> str:
    """A hash of the client's sources and the module files, so an edit rebuilds it."""
    digest = hashlib.sha256()
    for path in sorted([*MODULE.glob("go.*"), *(MODULE / "cmd").rglob("*.go")]):
        digest.update(path.relative_to(MODULE).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def go_build(go: str, output: Path, packages: list[str], what: str) -> None:
    env = {
        **os.environ,
        "CGO_ENABLED": "1",  # spire-server's SQLite datastore is cgo
        "GOFLAGS": "-p=1 -buildvcs=false -mod=readonly",
    }
    progress(f"building {what} (nice -n 19, GOFLAGS=-p=1; SPIRE takes many minutes)")
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    command = ["nice", "-n", "19", go, "build", "-v", "-trimpath", "-o", f"{staging}/", *packages]
    process = subprocess.Popen(
        command, cwd=MODULE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    tail: list[str] = []
    try:
        # `go build -v` names each package as it compiles it
        for built, line in enumerate(process.stdout, start=1):
            tail = [*tail[-4:], line.rstrip()]
            if built % 50 == 0:
                progress(f"{what}: {built} packages compiled, now {line.strip()}")
    except BaseException:  # interrupted: leave no compiler running behind us
        process.kill()
        process.wait()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if process.wait() != 0:
        shutil.rmtree(staging, ignore_errors=True)
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        hint = ""
        if "gcc" in " ".join(tail) or "cgo" in " ".join(tail):
            hint = " (spire-server needs a C compiler for cgo: apt-get install gcc)"
        raise MissingPiece(f"building {what} failed: {last}{hint}")
    output.mkdir(parents=True, exist_ok=True)
    for binary in staging.iterdir():
        binary.replace(output / binary.name)
    staging.rmdir()
    progress(f"{what} built into {output}")


def ensure_binaries() -> SpireBinaries:
    """The cached binaries, building those that are missing first."""
    go = shutil.which("go")
    if go is None:
        raise MissingPiece("no `go` on PATH: SPIRE and the go-spiffe client are built with Go")
    version = go_version(go)
    root = cache_dir()
    spire = root / version
    client = root / version / f"svid-latency-{client_key()}"
    if not (spire / "spire-server").is_file() or not (spire / "spire-agent").is_file():
        if shutil.which("gcc") is None and shutil.which("cc") is None:
            raise MissingPiece("no C compiler: spire-server needs cgo (apt-get install gcc)")
        go_build(
            go,
            spire,
            [
                "github.com/spiffe/spire/cmd/spire-server",
                "github.com/spiffe/spire/cmd/spire-agent",
            ],
            f"spire-server and spire-agent {SPIRE_VERSION}",
        )
    if not (client / "svid-latency").is_file():
        go_build(go, client, [CLIENT_PACKAGE], "the go-spiffe latency client")
    return SpireBinaries(
        server=spire / "spire-server",
        agent=spire / "spire-agent",
        client=client / "svid-latency",
        go_version=version,
    )


def main() -> int:
    binaries = ensure_binaries()
    print(json.dumps({k: str(v) for k, v in dataclasses.asdict(binaries).items()}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(f"{Path(sys.argv[0]).name}: interrupted") from None
