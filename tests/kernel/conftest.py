"""The kTLS guest must already be built (``make kernel``, which ``make unit`` runs
first): a missing build is a skip naming the command, which CI (``CI=true``) turns into
a failure, as for ``tests/kube``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .guest_vm import cached_folder

# The guest suite needs the guest's kernel; on the host it is not collected at all (a skip
# would fail CI), and test_guest.py runs it inside the guest instead.
collect_ignore_glob = [] if os.environ.get("TRELLIS_KTLS_GUEST") == "1" else ["guest/*"]


def _ci() -> bool:
    return os.environ.get("CI") in ("true", "1")


@pytest.fixture(scope="session")
def guest_kernel() -> Path:
    folder = cached_folder()
    if folder is None:
        message = "the kTLS test guest is not built: run `make kernel` (as root)"
        if _ci():
            pytest.fail(message)
        pytest.skip(message)
    return folder
