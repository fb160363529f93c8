"""The guest suite runs only inside the QEMU guest (``tests/kernel/guest_vm.py`` sets
TRELLIS_KTLS_GUEST=1); on the host it is skipped, and ``tests/kernel/test_guest.py``
boots the guest to run it."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    if os.environ.get("TRELLIS_KTLS_GUEST") == "1":
        return
    skip = pytest.mark.skip(reason="runs inside the kTLS guest (tests/kernel/test_guest.py)")
    for item in items:
        if "tests/kernel/guest/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(skip)
