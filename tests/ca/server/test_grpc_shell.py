"""The gRPC boundary's own table: each kind of ``Refusal`` the service raises has the gRPC
status the proto documents (the behaviour over real gRPC is in ``test_server.py``)."""

from __future__ import annotations

import grpc

from ca.api import CaError
from ca.server.grpc_shell import STATUS
from ca.server.service import RefusalKind


def test_every_kind_of_refusal_has_its_own_grpc_status() -> None:
    assert set(STATUS) == set(RefusalKind)
    assert len(set(STATUS.values())) == len(RefusalKind)
    assert grpc.StatusCode.OK not in STATUS.values()


def test_the_agent_retries_only_refusals_that_can_pass_later() -> None:
    assert {k for k, code in STATUS.items() if CaError(code, "").retryable} == {
        RefusalKind.UNAVAILABLE,
        RefusalKind.OVER_LIMIT,
    }
