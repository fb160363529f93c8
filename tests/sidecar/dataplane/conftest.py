"""Fixtures: a process registry that always cleans up, and a test trust domain."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Pki, Procs

CLIENT = "spiffe://example.org/ns/default/sa/client"
ECHO = "spiffe://example.org/ns/default/sa/echo"
INTRUDER = "spiffe://example.org/ns/default/sa/intruder"


@pytest.fixture
def procs() -> Iterator[Procs]:
    workdir = Path(tempfile.mkdtemp(prefix="tr-sc-"))
    registry = Procs(workdir)
    try:
        yield registry
    finally:
        running = list(registry.running)
        registry.stop_all()
        for proc in running:  # shown by pytest only when the test failed
            print(f"--- {proc.name} (exit {proc.popen.returncode}) ---\n{proc.output()[-4000:]}")
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def pki() -> Pki:
    return Pki("example.org")


@pytest.fixture(scope="session")
def foreign_pki() -> Pki:
    return Pki("other.example")
