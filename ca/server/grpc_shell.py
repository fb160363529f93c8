"""The thin gRPC shell around ``CaService``: decode, authenticate, call, map refusals.

Handlers are registered by hand (``grpc.method_handlers_generic_handler``) rather than
through the generated ``*_pb2_grpc`` module, so every line here is typed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from ca.bundle import TrustBundle
from ca.server._proto import ca_pb2
from ca.server.service import CaService, Refusal, log_event
from ca.server.wire import SERVICE, bundle_to_proto

__all__ = ["BundleWatch", "make_handler"]

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class BundleWatch:
    """The current bundle and a way to wait for the next one (WatchBundle streams)."""

    def __init__(self, bundle: TrustBundle) -> None:
        self.current = bundle
        # Foreign trust domains' bundles (federation), sorted by trust domain.
        self.federated: tuple[TrustBundle, ...] = ()
        self.closed = False
        self._changed = asyncio.Event()

    def close(self) -> None:
        """End every stream (graceful shutdown: watchers would otherwise hold the grace)."""
        self.closed = True
        self._changed.set()

    def publish(self, bundle: TrustBundle) -> None:
        if bundle.same_content(self.current) and bundle.sequence == self.current.sequence:
            return
        self.current = bundle
        self._wake()

    def poke(self) -> None:
        """Wake every stream without a change (they re-check whether their agent is banned)."""
        self._wake()

    def publish_federated(self, bundles: tuple[TrustBundle, ...]) -> None:
        self.federated = bundles
        self._wake()

    def _wake(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def updates(self) -> AsyncIterator[TrustBundle]:
        while not self.closed:
            waiter = self._changed
            yield self.current
            await waiter.wait()


def _peer_host(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    peer = context.peer() or "unknown"
    # "ipv4:127.0.0.1:5000" / "ipv6:[::1]:5000": rate-limit by host, not by port.
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer
    return host


def _client_chain(context: grpc.aio.ServicerContext[Any, Any]) -> bytes | None:
    # On the server side the "chain" property holds what the peer sent *after* its leaf
    # (OpenSSL's SSL_get_peer_cert_chain); the leaf is its own property.
    auth = context.auth_context()
    leaf = list(auth.get("x509_pem_cert") or ())
    if not leaf:
        return None
    rest = list(auth.get("x509_pem_cert_chain") or ())
    return leaf[0] + (rest[0] if rest else b"")


async def _refuse(
    service: CaService,
    context: grpc.aio.ServicerContext[Any, Any],
    method: str,
    refusal: Refusal,
    node: str | None,
) -> None:
    service.metrics.rejected(refusal.reason)
    log_event(
        logging.WARNING,
        "request-refused",
        method=method,
        code=refusal.code.name,
        reason=refusal.reason,
        node=node,
        peer=_peer_host(context),
        detail=refusal.detail,
    )
    await context.abort(refusal.code, refusal.detail)


def _authenticated(
    service: CaService,
    method: str,
    call: Callable[[Any, str], Message | Awaitable[Message]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Message:
        node: str | None = None
        try:
            service.check_size(request.ByteSize())
            node = service.authenticate(_client_chain(context))
            result = call(request, node)
            return await result if inspect.isawaitable(result) else result
        except Refusal as refusal:
            await _refuse(service, context, method, refusal, node)
            raise AssertionError("unreachable: abort raises") from None

    return handler


def make_handler(service: CaService, bundles: BundleWatch) -> grpc.GenericRpcHandler:
    async def attest(
        request: ca_pb2.AttestAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.AttestAgentResponse:
        try:
            service.check_size(request.ByteSize())
            return await service.attest_agent(request, _peer_host(context))
        except Refusal as refusal:
            await _refuse(service, context, "AttestAgent", refusal, None)
            raise AssertionError("unreachable: abort raises") from None

    async def watch_bundle(
        request: ca_pb2.WatchBundleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ca_pb2.Bundle]:
        try:
            node = service.authenticate(_client_chain(context))
        except Refusal as refusal:
            await _refuse(service, context, "WatchBundle", refusal, None)
            return
        log_event(logging.DEBUG, "bundle-watch", node=node)
        sent: tuple[TrustBundle, tuple[TrustBundle, ...]] | None = None
        async for bundle in bundles.updates():
            try:
                # A ban ends the stream of an agent already watching (poke() wakes it).
                service.check_not_banned(node)
            except Refusal as refusal:
                await _refuse(service, context, "WatchBundle", refusal, node)
                return
            if sent is not None and sent[0] is bundle and sent[1] is bundles.federated:
                continue  # woken by poke(), nothing new for this agent
            sent = (bundle, bundles.federated)
            message = bundle_to_proto(bundle)
            message.federated.extend(bundle_to_proto(f) for f in bundles.federated)
            yield message

    def unary(
        fn: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]],
        request_type: type[Message],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=request_type.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "AttestAgent": unary(attest, ca_pb2.AttestAgentRequest),
        "RenewAgent": unary(
            _authenticated(service, "RenewAgent", service.renew_agent), ca_pb2.RenewAgentRequest
        ),
        "BatchNewX509SVID": unary(
            _authenticated(service, "BatchNewX509SVID", service.batch_new_x509_svid),
            ca_pb2.BatchNewX509SVIDRequest,
        ),
        "NewJWTSVID": unary(
            _authenticated(service, "NewJWTSVID", service.new_jwt_svid), ca_pb2.NewJWTSVIDRequest
        ),
        "FetchEntries": unary(
            _authenticated(service, "FetchEntries", service.fetch_entries),
            ca_pb2.FetchEntriesRequest,
        ),
        "WatchBundle": grpc.unary_stream_rpc_method_handler(
            watch_bundle,
            request_deserializer=ca_pb2.WatchBundleRequest.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)
