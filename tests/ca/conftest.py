from __future__ import annotations

import datetime as dt

import pytest

from ca import IntermediateAuthority, KeyAlgorithm, RootAuthority, TrustDomain

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="session")
def now() -> dt.datetime:
    return NOW


@pytest.fixture(scope="session")
def root() -> RootAuthority:
    return RootAuthority.create(TrustDomain("example.org"), now=NOW)


@pytest.fixture(scope="session")
def intermediate(root: RootAuthority) -> IntermediateAuthority:
    return root.issue_intermediate("west", now=NOW)


@pytest.fixture(scope="session")
def other_root() -> RootAuthority:
    return RootAuthority.create(TrustDomain("other.test"), now=NOW, key_algorithm=KeyAlgorithm.P256)


@pytest.fixture(scope="session")
def other_intermediate(other_root: RootAuthority) -> IntermediateAuthority:
    return other_root.issue_intermediate("east", now=NOW)
