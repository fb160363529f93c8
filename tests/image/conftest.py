"""Fixtures for the image tests: the built image, and containers that are always removed.

The image is built (or found up to date) once per session by ``build.py``; a machine
without podman, runc or debootstrap, or a run as non-root, skips with one line naming
what is missing, which CI (``CI=true``, see tests/conftest.py) turns into a failure.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from .build import ImageUnavailable, build, podman, run_options

START_TIMEOUT = 60.0  # seconds for one `podman run` to return: image mount, runc create


@pytest.fixture(scope="session")
def trellis_image() -> str:
    try:
        return build()
    except ImageUnavailable as exc:
        pytest.skip(f"trellis image: {exc}")


def run_once(
    image: str, *args: str, options: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """``podman run --rm`` to completion, with no network; its output and status."""
    return subprocess.run(
        podman("run", "--rm", *run_options(), "--network=none", *options, image, *args),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


@dataclass
class Containers:
    """Detached containers of one test, removed (``podman rm -f``) when it ends."""

    image: str
    names: list[str] = field(default_factory=list)

    def start(self, role: str, options: Sequence[str], args: Sequence[str]) -> str:
        name = f"trellis-test-{role}-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        result = subprocess.run(
            podman("run", "-d", "--name", name, *run_options(), *options, self.image, *args),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(f"podman run of {role} failed: {result.stderr.strip()}")
        return name

    def logs(self, name: str) -> str:
        result = subprocess.run(
            podman("logs", "--tail", "20", name), capture_output=True, text=True, check=False
        )
        return result.stdout + result.stderr

    def all_logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.logs(name)}" for name in self.names)

    def running(self, name: str) -> bool:
        result = subprocess.run(
            podman("container", "inspect", "--format", "{{.State.Running}}", name),
            capture_output=True,
            text=True,
            check=False,
        )
        return result.stdout.strip() == "true"

    def remove_all(self) -> None:
        for name in reversed(self.names):
            subprocess.run(podman("rm", "-f", "-t", "2", name), capture_output=True, check=False)
        self.names.clear()


@pytest.fixture
def containers(trellis_image: str) -> Iterator[Containers]:
    started = Containers(trellis_image)
    try:
        yield started
    finally:
        started.remove_all()
