"""``CaError``: how every failed call of the CA's API reaches the agent."""

from __future__ import annotations

import grpc

__all__ = ["CaError"]

_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class CaError(Exception):
    """A CA call failed. ``code`` is the gRPC status name (e.g. ``"PERMISSION_DENIED"``)."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        self.status = code
        self.code = code.name
        self.detail = detail
        super().__init__(f"{code.name}: {detail}")

    @property
    def retryable(self) -> bool:
        return self.status in _RETRYABLE
