"""A small blocking Workload API client (``trellis svid fetch``, the benchmark).

Standard clients (py-spiffe, go-spiffe) are what workloads use; this one exists so the
``trellis`` CLI needs nothing beyond grpcio. Errors become ``WorkloadApiError`` carrying
the gRPC status name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ca.workload import HEADER_KEY, HEADER_VALUE, method_path, workload_pb2

__all__ = ["ENDPOINT_ENV", "WorkloadApiError", "WorkloadClient", "endpoint_address"]

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
_METADATA = ((HEADER_KEY, HEADER_VALUE),)


class WorkloadApiError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        super().__init__(f"{code}: {detail}")


def endpoint_address(socket_path: Path | str | None = None) -> str:
    """A gRPC target for the Workload API: the path given, else ``$SPIFFE_ENDPOINT_SOCKET``."""
    if socket_path is None:
        env = os.environ.get(ENDPOINT_ENV)
        if env:
            # The SPIFFE endpoint form is "unix:///path" (or "unix:/path"); grpc wants "unix:/path".
            if env.startswith("unix://"):
                return "unix:" + env[len("unix://") :]
            return env
        socket_path = "/run/trellis/agent.sock"
    return f"unix:{socket_path}"


@dataclass
class WorkloadClient:
    target: str
    timeout: float = 10.0
    send_header: bool = True

    def __post_init__(self) -> None:
        self._channel = grpc.insecure_channel(self.target)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> WorkloadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return _METADATA if self.send_header else ()

    def _first(self, method: str, request: Any, response_type: Any) -> Any:
        call: grpc.UnaryStreamMultiCallable[Any, Any] = self._channel.unary_stream(
            method_path(method),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        stream = call(request, metadata=self._metadata(), timeout=self.timeout)
        try:
            for response in stream:
                return response
        except grpc.RpcError as exc:
            raise WorkloadApiError(exc.code().name, exc.details() or "") from exc
        finally:
            stream.cancel()
        raise WorkloadApiError("UNAVAILABLE", f"{method} stream ended without a response")

    def _unary(self, method: str, request: Any, response_type: Any) -> Any:
        call: grpc.UnaryUnaryMultiCallable[Any, Any] = self._channel.unary_unary(
            method_path(method),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        try:
            return call(request, metadata=self._metadata(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise WorkloadApiError(exc.code().name, exc.details() or "") from exc

    def fetch_x509_svid(self) -> workload_pb2.X509SVIDResponse:
        response: workload_pb2.X509SVIDResponse = self._first(
            "FetchX509SVID", workload_pb2.X509SVIDRequest(), workload_pb2.X509SVIDResponse
        )
        return response

    def fetch_x509_bundles(self) -> workload_pb2.X509BundlesResponse:
        response: workload_pb2.X509BundlesResponse = self._first(
            "FetchX509Bundles", workload_pb2.X509BundlesRequest(), workload_pb2.X509BundlesResponse
        )
        return response

    def fetch_jwt_bundles(self) -> workload_pb2.JWTBundlesResponse:
        response: workload_pb2.JWTBundlesResponse = self._first(
            "FetchJWTBundles", workload_pb2.JWTBundlesRequest(), workload_pb2.JWTBundlesResponse
        )
        return response

    def fetch_jwt_svid(
        self, audience: Sequence[str], spiffe_id: str = ""
    ) -> workload_pb2.JWTSVIDResponse:
        response: workload_pb2.JWTSVIDResponse = self._unary(
            "FetchJWTSVID",
            workload_pb2.JWTSVIDRequest(audience=list(audience), spiffe_id=spiffe_id),
            workload_pb2.JWTSVIDResponse,
        )
        return response

    def validate_jwt_svid(self, audience: str, token: str) -> workload_pb2.ValidateJWTSVIDResponse:
        response: workload_pb2.ValidateJWTSVIDResponse = self._unary(
            "ValidateJWTSVID",
            workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token),
            workload_pb2.ValidateJWTSVIDResponse,
        )
        return response
