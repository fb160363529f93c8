"""Build the trellis image (``Containerfile``) with podman, from this checkout, offline.

Two images, each rebuilt only when its inputs change:

* the base, ``localhost/trellis-base:bookworm``: Debian bookworm by ``debootstrap
  --variant=minbase --include=python3`` from Debian's mirror, imported with ``podman
  import`` (no registry is reachable, so nothing is pulled). Its label
  ``dev.trellis.base.inputs`` holds a hash of what debootstrap was asked for.
* the image, ``localhost/trellis:<version>`` (the version of ``pyproject.toml``): built
  ``--pull=never`` from a context of wheels made here on the host -- the project's own
  and those of its runtime dependencies at the versions this environment runs -- so the
  build needs no network. Its label ``dev.trellis.image.inputs`` holds a hash of the
  Containerfile, the project's sources, the pinned dependency list and the base image.

The tag scheme: ``localhost/trellis`` (``REPOSITORY``, the Makefile's
``IMAGE_REPOSITORY``) and the project version as the tag (``IMAGE`` here, ``IMAGE`` in the
Makefile); the manifests, the injector's default and the Helm chart name that image.

podman runs with ``--runtime runc`` and lowered ulimits (crun refuses this kind of
machine's hybrid cgroups; runc's setrlimit fails with podman's default nproc). A file
lock makes concurrent builders (pytest-xdist workers, ``make``) wait for one build.
Run as ``python -m tests.image.build`` (``make image`` does) for progress lines;
``--check`` only looks for the tools. Whatever is missing is one line
(``ImageUnavailable``), exit status 1.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"
DISTRIBUTION = "trellis-mesh"
REPOSITORY = "localhost/trellis"
VERSION: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"{REPOSITORY}:{VERSION}"
SOURCE = "https://github.com/trellis-mesh/trellis"
BASE_IMAGE = "localhost/trellis-base:bookworm"
BASE_SUITE = "bookworm"
BASE_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3",)  # minbase plus the interpreter; the rest comes as wheels
IMAGE_LABEL = "dev.trellis.image.inputs"
BASE_LABEL = "dev.trellis.base.inputs"
# What the wheel carries (pyproject's packages.find, plus the files setuptools reads).
PROJECT_FILES = ("pyproject.toml", "README.md")
PACKAGES = ("core", "ca", "meshapi", "sidecar", "mesh_operator", "trellis")
PODMAN_RUN = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
TOOLS = ("podman", "runc", "debootstrap")
STEP_TIMEOUT = 1800.0  # debootstrap over a slow mirror: minutes, not hours


class ImageUnavailable(RuntimeError):
    """The image cannot be built here; the message is one line saying why."""


def podman(*args: str) -> list[str]:
    """The podman command line every caller uses: runc, not crun."""
    return ["podman", "--runtime", "runc", *args]


def run_options() -> list[str]:
    """Options every ``podman run`` of the image needs on this kind of machine."""
    return ["--pull=never", *PODMAN_RUN]


def check_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise ImageUnavailable(
            f"missing {', '.join(missing)}: install the Debian packages"
            f" ({'apt-get install ' + ' '.join(TOOLS)}), as `make image` does as root"
        )
    if os.geteuid() != 0:
        raise ImageUnavailable("building the image needs root (debootstrap, rootful podman)")


def _run(argv: Sequence[str], what: str, *, stdin: int | None = None) -> str:
    try:
        result = subprocess.run(
            ["nice", "-n", "10", *argv],  # the machines are shared: builds yield
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ImageUnavailable(f"{what} took over {STEP_TIMEOUT:.0f}s") from None
    if result.returncode != 0:
        # podman build ends with "Error: building at STEP <the whole RUN>": the line that
        # says what went wrong is the last one before it.
        lines = [
            line.strip()
            for line in (result.stdout + "\n" + result.stderr).splitlines()
            if line.strip() and not line.startswith("Error: building at STEP")
        ]
        last = lines[-1] if lines else f"exit status {result.returncode}"
        raise ImageUnavailable(f"{what} failed: {last}")
    return result.stdout.strip()


def image_label(image: str, label: str) -> str | None:
    """The label's value on a local image; None if there is no such image (or label)."""
    result = subprocess.run(
        podman("image", "inspect", "--format", "{{json .Labels}}", image),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    labels = json.loads(result.stdout or "null") or {}
    value = labels.get(label)
    return value if isinstance(value, str) else None


def image_id(image: str) -> str | None:
    result = subprocess.run(
        podman("image", "inspect", "--format", "{{.Id}}", image),
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def base_inputs() -> str:
    wanted = {"suite": BASE_SUITE, "variant": "minbase", "mirror": BASE_MIRROR}
    wanted["include"] = ",".join(BASE_PACKAGES)
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]


def runtime_requirements() -> list[str]:
    """``name==version`` of every runtime dependency, transitively, as installed here: the
    image runs what the tests ran, not whatever PyPI resolves to today."""
    pins: dict[str, str] = {}
    pending = [DISTRIBUTION]
    while pending:
        dist = importlib.metadata.distribution(pending.pop())
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins:
            continue
        pins[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    del pins[canonicalize_name(DISTRIBUTION)]
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _source_files() -> list[Path]:
    files = [ROOT / name for name in PROJECT_FILES]
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path)
    return files


def image_inputs(requirements: Sequence[str], base_id: str) -> str:
    """What the image is made of: a change to any of it builds afresh."""
    digest = hashlib.sha256()
    pip_version = importlib.metadata.version("pip")
    for part in (CONTAINERFILE.read_bytes(), base_id.encode(), f"pip=={pip_version}".encode()):
        digest.update(part + b"\0")
    digest.update("\n".join(requirements).encode() + b"\0")
    for path in _source_files():
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trellis" / "image"


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, flush=True)


def build_base(progress: bool = False) -> str:
    """The base image's id, made by debootstrap first if its inputs changed."""
    wanted = base_inputs()
    if image_label(BASE_IMAGE, BASE_LABEL) == wanted:
        return image_id(BASE_IMAGE) or BASE_IMAGE
    old = image_id(BASE_IMAGE)
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache_dir()))
    try:
        _say(progress, f"debootstrap {BASE_SUITE} from {BASE_MIRROR} (a few minutes)")
        _run(
            [
                "debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                BASE_SUITE, str(root), BASE_MIRROR,
            ],
            f"debootstrap {BASE_SUITE} from {BASE_MIRROR}",
        )  # fmt: skip
        _say(progress, f"importing the root file system as {BASE_IMAGE}")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        try:
            _run(
                podman("import", "--change", f"LABEL {BASE_LABEL}={wanted}", "-", BASE_IMAGE),
                f"podman import of {BASE_IMAGE}",
                stdin=tar.stdout.fileno(),
            )
        finally:
            tar.stdout.close()
            tar.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _remove_replaced(old, BASE_IMAGE)
    return image_id(BASE_IMAGE) or BASE_IMAGE


def build_wheels(requirements: Sequence[str], into: Path, progress: bool = False) -> None:
    """The project's wheel (from a copy of its sources: setuptools writes build/ and
    egg-info where it builds) and the pinned dependencies' wheels, pip's own included
    (the build stage installs with it)."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _say(progress, f"building wheels: {DISTRIBUTION} {VERSION} and {len(requirements)} pins")
    with tempfile.TemporaryDirectory(prefix="src-", dir=cache_dir()) as scratch:
        source = Path(scratch)
        for path in _source_files():
            target = source / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        _run(
            [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(into), str(source)],
            f"pip wheel of {DISTRIBUTION}",
        )
    pip_pin = f"pip=={importlib.metadata.version('pip')}"
    _run(
        [*pip, "wheel", "--no-deps", "-w", str(into), *requirements, pip_pin],
        "pip wheel of the runtime dependencies",
    )


def build(progress: bool = False) -> str:
    """Build (or find) the image; its name."""
    check_tools()
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        base_id = build_base(progress)
        requirements = runtime_requirements()
        wanted = image_inputs(requirements, base_id)
        if image_label(IMAGE, IMAGE_LABEL) == wanted:
            _say(progress, f"{IMAGE} is up to date (inputs {wanted})")
            return IMAGE
        old = image_id(IMAGE)
        with tempfile.TemporaryDirectory(prefix="context-", dir=cache_dir()) as context:
            wheels = Path(context) / "wheels"
            build_wheels(requirements, wheels, progress)
            _say(progress, f"podman build of {IMAGE} (a minute or two)")
            _run(
                podman(
                    "build", "--pull=never", "--layers=false", *PODMAN_RUN,
                    "--build-arg", f"BASE={BASE_IMAGE}",
                    "--build-arg", f"VERSION={VERSION}",
                    "--build-arg", f"SOURCE={SOURCE}",
                    "--build-arg", f"INPUTS={wanted}",
                    "--tag", IMAGE, "--file", str(CONTAINERFILE), context,
                ),
                f"podman build of {IMAGE}",
            )  # fmt: skip
        _remove_replaced(old, IMAGE)
    return IMAGE


def _remove_replaced(old: str | None, name: str) -> None:
    """The image a rebuild untagged, hundreds of MB on a shared disk; kept if in use."""
    if old is not None and old != image_id(name):
        subprocess.run(podman("rmi", old), capture_output=True, check=False)


def main(argv: list[str]) -> int:
    try:
        if argv == ["--check"]:
            check_tools()
            print(f"podman, runc and debootstrap found; the image is {IMAGE}")
            return 0
        if argv:
            print("usage: python -m tests.image.build [--check]", file=sys.stderr)
            return 2
        name = build(progress=True)
    except ImageUnavailable as exc:
        print(f"trellis image: {exc}", file=sys.stderr)
        return 1
    print(f"trellis image ready: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
