"""The thin gRPC shell around ``CaService``: decode, authenticate, call, map refusals.

The only place the CA server sees protobuf or grpc: requests become Trellis values here and
answers become messages again (``ca.api.convert``), and a ``Refusal`` becomes the gRPC
status of its kind (``STATUS``). Handlers are registered by hand
(``grpc.method_handlers_generic_handler``) rather than through the generated ``*_pb2_grpc``
module, so every line here is typed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from ca.api import convert
from ca.api._proto import ca_pb2
from ca.api.values import BundleUpdate, SignedSvid
from ca.bundle import TrustBundle
from ca.server.service import CaService, Refusal, RefusalKind, log_event
from ca.server.stek import EchKey, StekKey, StekRingState, StekWatch
from ca.spiffeid import SpiffeId

__all__ = ["STATUS", "BundleWatch", "SigningStreams", "make_handler", "stek_rings_to_proto"]

_SIGNING_STREAM = "StreamX509SVIDs"

# The gRPC status each kind of refusal is answered with: the codes the proto documents and
# ``CaError.retryable`` reads on the agent's side (UNAVAILABLE and RESOURCE_EXHAUSTED are
# retried with backoff; the rest are not).
STATUS: dict[RefusalKind, grpc.StatusCode] = {
    RefusalKind.NOT_AUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    RefusalKind.NOT_PERMITTED: grpc.StatusCode.PERMISSION_DENIED,
    RefusalKind.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    RefusalKind.OVER_LIMIT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RefusalKind.AUTHORITY_EXPIRING: grpc.StatusCode.FAILED_PRECONDITION,
    RefusalKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    RefusalKind.INCOMPLETE: grpc.StatusCode.INTERNAL,
}


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


class SigningStreams:
    """The open StreamX509SVIDs calls, so that a graceful stop and a ban can end them.

    On a stop, a stream waiting for its agent's next request ends at once (OK: nothing of
    its own is lost); one signing a batch answers it first and then ends. On a ban, the
    streams of the banned nodes stop waiting and end with the ban's refusal.
    """

    def __init__(self) -> None:
        self.closed = False
        self._reading: dict[asyncio.Task[Any], str] = {}
        self._recheck: set[asyncio.Task[Any]] = set()

    def close(self) -> None:
        self.closed = True
        for task in list(self._reading):
            task.cancel()

    def end_banned(self, banned: Callable[[str], bool]) -> None:
        for task, node in list(self._reading.items()):
            if banned(node):
                self._recheck.add(task)
                task.cancel()

    async def read(self, context: grpc.aio.ServicerContext[Any, Any], node: str) -> Any:
        """The next request; ``grpc.aio.EOF`` when the agent or the CA ends the stream;
        None when the caller is to check the agent again (a ban came in meanwhile)."""
        if self.closed:
            return grpc.aio.EOF
        task = asyncio.current_task()
        assert task is not None
        self._reading[task] = node
        try:
            return await context.read()
        except asyncio.CancelledError:
            if self.closed:
                return grpc.aio.EOF
            if task in self._recheck:
                task.uncancel()
                return None
            raise
        finally:
            self._reading.pop(task, None)
            self._recheck.discard(task)


def _stek(key: StekKey) -> ca_pb2.STEK:
    return ca_pb2.STEK(
        key_id=key.key_id, key=key.key, not_before=key.not_before, not_after=key.not_after
    )


def _ech_key(key: EchKey) -> ca_pb2.ECHKey:
    return ca_pb2.ECHKey(
        config_id=key.config_id,
        public_key=key.public_key,
        private_key=key.private_key,
        public_name=key.public_name,
        not_before=key.not_before,
        not_after=key.not_after,
    )


def stek_rings_to_proto(
    rings: tuple[StekRingState, ...],
    ech_public: tuple[tuple[SpiffeId, tuple[EchKey, ...]], ...] = (),
) -> ca_pb2.STEKRings:
    return ca_pb2.STEKRings(
        rings=[
            ca_pb2.STEKRing(
                spiffe_id=str(ring.spiffe_id),
                active=_stek(ring.active),
                previous=[_stek(k) for k in ring.previous],
                next=_stek(ring.next),
                rotation_seconds=ring.rotation_seconds,
                ech_keys=[_ech_key(k) for k in ring.ech],
            )
            for ring in rings
        ],
        ech_public=[
            ca_pb2.ECHPublicConfig(spiffe_id=str(i), keys=[_ech_key(k) for k in keys])
            for i, keys in ech_public
        ],
    )


def _svids(svids: list[SignedSvid]) -> list[ca_pb2.X509SVID]:
    return [convert.signed_svid_to_proto(s) for s in svids]


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


def _record_refusal(
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
        code=STATUS[refusal.kind].name,
        reason=refusal.reason,
        node=node,
        peer=_peer_host(context),
        detail=refusal.detail,
    )


async def _refuse(
    service: CaService,
    context: grpc.aio.ServicerContext[Any, Any],
    method: str,
    refusal: Refusal,
    node: str | None,
) -> None:
    _record_refusal(service, context, method, refusal, node)
    await context.abort(STATUS[refusal.kind], refusal.detail)


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


def make_handler(
    service: CaService,
    bundles: BundleWatch,
    streams: SigningStreams | None = None,
    steks: StekWatch | None = None,
) -> grpc.GenericRpcHandler:
    streams = streams or SigningStreams()

    async def stream_x509_svids(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        chain = _client_chain(context)
        try:
            node = service.authenticate(chain)
        except Refusal as refusal:
            await _refuse(service, context, _SIGNING_STREAM, refusal, None)
            return
        log_event(logging.DEBUG, "signing-stream", node=node)
        service.metrics.signing_stream_opened()
        try:
            await serve_signing_stream(context, chain, node)
        finally:
            service.metrics.signing_stream_closed()

    async def serve_signing_stream(
        context: grpc.aio.ServicerContext[Any, Any], chain: bytes | None, node: str
    ) -> None:
        while True:
            message = await streams.read(context, node)
            if message is grpc.aio.EOF:
                return
            try:
                # Again for every request: the agent SVID may have expired or the node
                # been banned since the stream opened (cached, a dictionary lookup).
                service.authenticate(chain)
            except Refusal as refusal:
                await _refuse(service, context, _SIGNING_STREAM, refusal, node)
                return
            if message is None:
                # Woken by a ban lifted again before this check. The interrupted read
                # may have lost a request: end the stream (OK), the agent opens another.
                return
            try:
                service.check_size(message.ByteSize())
                svids = await service.batch_new_x509_svid(
                    convert.svid_requests_from_proto(message.batch), node
                )
                reply = ca_pb2.StreamX509SVIDsResponse(id=message.id, svids=_svids(svids))
            except Refusal as refusal:
                _record_refusal(service, context, _SIGNING_STREAM, refusal, node)
                reply = ca_pb2.StreamX509SVIDsResponse(
                    id=message.id,
                    code=STATUS[refusal.kind].value[0],
                    reason=refusal.reason,
                    detail=refusal.detail,
                )
            await context.write(reply)

    async def attest(
        request: ca_pb2.AttestAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.AttestAgentResponse:
        try:
            service.check_size(request.ByteSize())
            answer = await service.attest_agent(
                convert.attestation_from_proto(request), _peer_host(context)
            )
            return convert.agent_svid_to_attest_response(answer)
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
            yield convert.bundle_update_to_proto(BundleUpdate(bundle, bundles.federated))

    async def watch_stek_rings(
        raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[ca_pb2.STEKRings]:
        method = "WatchSTEKRings"
        node: str | None = None
        try:
            service.check_size(len(raw))
            node = service.authenticate(_client_chain(context))
            # Parsed here, not by grpc: bytes that are no request get INVALID_ARGUMENT and
            # one log line, not a DecodeError traceback from grpc's deserializer.
            try:
                request = ca_pb2.WatchSTEKRingsRequest.FromString(raw)
            except DecodeError as exc:
                raise Refusal(
                    RefusalKind.MALFORMED, "malformed-request", "not a WatchSTEKRingsRequest"
                ) from exc
            if request.node and request.node != node:
                # An agent gets the keys of its own node's identities only: never let
                # one node's SVID pull another node's services' keys.
                raise Refusal(
                    RefusalKind.NOT_PERMITTED,
                    "stek-node-mismatch",
                    f"this agent is node {node}, not {request.node!r}",
                )
            if steks is None:
                raise Refusal(
                    RefusalKind.UNAVAILABLE, "stek-not-served", "this CA serves no STEK rings"
                )
        except Refusal as refusal:
            await _refuse(service, context, method, refusal, node)
            return
        log_event(logging.DEBUG, "stek-watch", node=node)
        sent: object = None
        async for _ in steks.changes():
            try:
                service.check_not_banned(node)
            except Refusal as refusal:
                await _refuse(service, context, method, refusal, node)
                return
            ids = {entry.spiffe_id for entry in service.entries.current().for_node(node)}
            rings = steks.leader.rings_for(ids)
            # Another node's service rotating its ECH key changes what this node's callers
            # seal to: that is news here too.
            ech_public = steks.leader.public_ech()
            if (rings, ech_public) == sent:
                continue
            sent = (rings, ech_public)
            # Names and key ids only: the keys themselves never reach a log line.
            log_event(
                logging.INFO,
                "stek-rings-sent",
                node=node,
                spiffe_ids=[str(r.spiffe_id) for r in rings],
                active_key_ids=[r.active.key_id.hex() for r in rings],
            )
            yield stek_rings_to_proto(rings, ech_public)

    def unary(
        fn: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Message]],
        request_type: type[Message],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=request_type.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )

    def renew(request: ca_pb2.RenewAgentRequest, node: str) -> ca_pb2.RenewAgentResponse:
        return convert.agent_svid_to_renew_response(service.renew_agent(request.csr, node))

    async def batch(
        request: ca_pb2.BatchNewX509SVIDRequest, node: str
    ) -> ca_pb2.BatchNewX509SVIDResponse:
        svids = await service.batch_new_x509_svid(convert.svid_requests_from_proto(request), node)
        return ca_pb2.BatchNewX509SVIDResponse(svids=_svids(svids))

    def new_jwt(request: ca_pb2.NewJWTSVIDRequest, node: str) -> ca_pb2.NewJWTSVIDResponse:
        token = service.new_jwt_svid(request.entry_id, tuple(request.audience), node)
        return convert.jwt_svid_to_proto(token)

    def entries(request: ca_pb2.FetchEntriesRequest, node: str) -> ca_pb2.FetchEntriesResponse:
        return convert.node_entries_to_proto(service.fetch_entries(node))

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "AttestAgent": unary(attest, ca_pb2.AttestAgentRequest),
        "RenewAgent": unary(_authenticated(service, "RenewAgent", renew), ca_pb2.RenewAgentRequest),
        "BatchNewX509SVID": unary(
            _authenticated(service, "BatchNewX509SVID", batch), ca_pb2.BatchNewX509SVIDRequest
        ),
        "NewJWTSVID": unary(
            _authenticated(service, "NewJWTSVID", new_jwt), ca_pb2.NewJWTSVIDRequest
        ),
        "FetchEntries": unary(
            _authenticated(service, "FetchEntries", entries), ca_pb2.FetchEntriesRequest
        ),
        _SIGNING_STREAM: grpc.stream_stream_rpc_method_handler(
            stream_x509_svids,
            request_deserializer=ca_pb2.StreamX509SVIDsRequest.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        ),
        "WatchBundle": grpc.unary_stream_rpc_method_handler(
            watch_bundle,
            request_deserializer=ca_pb2.WatchBundleRequest.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        ),
        "WatchSTEKRings": grpc.unary_stream_rpc_method_handler(
            watch_stek_rings,
            request_deserializer=bytes,
            response_serializer=lambda m: m.SerializeToString(),
        ),
    }
    return grpc.method_handlers_generic_handler(convert.SERVICE, handlers)
