"""The SPIFFE Workload API (``SpiffeWorkloadAPI``) served from the agent's cache.

Every call, in order (SPIFFE Workload API §5 and SPIRE's behaviour, which standard clients
expect):

1. metadata ``workload.spiffe.io: true`` must be present, else INVALID_ARGUMENT (the header
   proves the request was made deliberately by a Workload API client, not smuggled into the
   socket by a confused proxy);
2. the caller is attested from the connection's SO_PEERCRED (``peercred.py``) and what
   the agent read of it in /proc when it accepted the connection (``attestation.py``);
   a caller the kernel cannot vouch for, or that is no longer the process and program
   that connected (it exited, or it executed another program since), is
   PERMISSION_DENIED, and the refusal is logged;
3. a call that arrives before the agent's first successful sync with its CA waits for
   that sync (the socket is open from start-up, so a workload started alongside the agent
   may well call first), then goes on as below; if the sync has not happened within
   ``WorkloadApiConfig.sync_wait`` (or just before the caller's own deadline, so the caller
   learns why), the answer is UNAVAILABLE, which clients retry. Never PERMISSION_DENIED:
   before the sync no entry is known, so "no identity" would be a lie. A caller whose
   attestation is still pending (a pod the agent has not seen yet) waits the same way;
4. the caller's selectors are matched against this node's entries; no entry means
   PERMISSION_DENIED ("no identity issued"), also for bundle fetches and JWT validation
   unless ``allow_unauthenticated_verifiers`` is set.

Logs (``trellis.agent.workload_api``, fields as ``core.logs`` renders them): every refused
call is one ``workload-api-refused`` line with the method, the gRPC code, the reason and
the caller's ``pid``/``uid`` (when the kernel vouched for it), at WARNING, or INFO for
UNAVAILABLE, which clients retry; every X509-SVID set sent (``x509-svid-sent``, again on
each rotation) and every JWT-SVID issued (``jwt-svid-issued``, with its audience) is an INFO
line naming the SPIFFE IDs and the caller's pid/uid. Never a key or a token.

Streams (FetchX509SVID, FetchX509Bundles, FetchJWTBundles) send the full current state at
once, then again whenever it changes (a rotation, a bundle update, an entry change), and
never send the same state twice. The match is redone on every change: when an entry
disappears, or the caller is no longer the process and program that connected, the stream
ends with PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from cryptography.hazmat.primitives import serialization

from ca.agent.attestation import (
    AttestationError,
    AttestationPending,
    EntryMatcher,
    PeerCredentials,
    SubsetMatcher,
    WorkloadAttestor,
)
from ca.agent.metrics import AgentMetrics
from ca.agent.peercred import PeerRegistry
from ca.agent.rotator import Rotator
from ca.agent.upstream import UpstreamError, UpstreamRefused
from ca.bundle import TrustBundle
from ca.entries import RegistrationEntry
from ca.jwtsvid import JwtSvidError, validate_jwt_svid
from ca.keys import PublicKey
from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from ca.workload import HEADER_KEY, HEADER_VALUE, SERVICE, workload_pb2

__all__ = [
    "MAX_AUDIENCES",
    "MAX_AUDIENCE_LENGTH",
    "MAX_REQUEST_BYTES",
    "WorkloadApi",
    "WorkloadApiConfig",
    "server_options",
]

log = logging.getLogger("trellis.agent.workload_api")

# Requests are tiny (the largest is a JWT to validate, itself capped at 8 KiB); anything
# bigger is refused by grpcio with RESOURCE_EXHAUSTED before it is parsed.
MAX_REQUEST_BYTES = 64 * 1024
MAX_AUDIENCES = 32
MAX_AUDIENCE_LENGTH = 512
# How long a new X509 stream waits for SVIDs still being signed before sending a partial set.
FIRST_RESPONSE_GRACE = 2.0
# A call waiting for the first sync gives up this long before the caller's deadline, so the
# caller gets UNAVAILABLE with the reason rather than a bare DEADLINE_EXCEEDED.
DEADLINE_MARGIN = 0.25
# How often a caller whose attestation is pending is attested again while it waits.
ATTESTATION_RETRY = 0.05

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")


def server_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        # Streams may sit idle for an SVID lifetime; let clients keep them alive cheaply.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]


@dataclass(frozen=True)
class WorkloadApiConfig:
    allow_unauthenticated_verifiers: bool = False
    # How long a call made before the agent's first sync with its CA (or while its own
    # attestation is pending) waits before it is answered UNAVAILABLE.
    sync_wait: float = 5.0


@dataclass(frozen=True)
class _Caller:
    credentials: PeerCredentials
    selectors: frozenset[Any]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(detail)


def _caller_fields(credentials: PeerCredentials | None) -> dict[str, object]:
    """Who called, as the kernel said (SO_PEERCRED); nothing when it could not say."""
    if credentials is None:
        return {}
    return {"pid": credentials.pid, "uid": credentials.uid, "gid": credentials.gid}


def _der_certs(bundle: TrustBundle) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities)


class WorkloadApi:
    def __init__(
        self,
        rotator: Rotator,
        peers: PeerRegistry,
        attestor: WorkloadAttestor,
        *,
        matcher: EntryMatcher | None = None,
        metrics: AgentMetrics | None = None,
        config: WorkloadApiConfig | None = None,
    ) -> None:
        self.rotator = rotator
        self.peers = peers
        self.attestor = attestor
        self.matcher = matcher if matcher is not None else SubsetMatcher()
        self.metrics = metrics if metrics is not None else rotator.metrics
        self.config = config if config is not None else WorkloadApiConfig()

    # -- the gRPC surface -------------------------------------------------------------------

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def stream(
            name: str,
            handler: Callable[[Any, Context], AsyncIterator[Any]],
            request_type: Any,
        ) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(name, handler),
                request_deserializer=request_type.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )

        def unary(
            name: str,
            handler: Callable[[Any, Context], Awaitable[Any]],
            request_type: Any,
        ) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(name, handler),
                request_deserializer=request_type.FromString,
                response_serializer=lambda m: m.SerializeToString(),
            )

        pb = workload_pb2
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "FetchX509SVID": stream("FetchX509SVID", self.fetch_x509_svid, pb.X509SVIDRequest),
                "FetchX509Bundles": stream(
                    "FetchX509Bundles", self.fetch_x509_bundles, pb.X509BundlesRequest
                ),
                "FetchJWTSVID": unary("FetchJWTSVID", self.fetch_jwt_svid, pb.JWTSVIDRequest),
                "FetchJWTBundles": stream(
                    "FetchJWTBundles", self.fetch_jwt_bundles, pb.JWTBundlesRequest
                ),
                "ValidateJWTSVID": unary(
                    "ValidateJWTSVID", self.validate_jwt_svid, pb.ValidateJWTSVIDRequest
                ),
            },
        )

    def _streaming(
        self, name: str, handler: Callable[[Any, Context], AsyncIterator[Any]]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        metrics = self.metrics

        async def run(request: Any, context: Context) -> AsyncIterator[Any]:
            metrics.workload_streams.inc()
            code = "OK"
            try:
                async for response in handler(request, context):
                    yield response
            except _Abort as exc:
                code = exc.code.name
                self._log_refusal(name, context, exc)
                await context.abort(exc.code, exc.detail)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                metrics.workload_streams.dec()
                metrics.workload_requests.labels(name, code).inc()

        return run

    def _unary(
        self, name: str, handler: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        metrics = self.metrics

        async def run(request: Any, context: Context) -> Any:
            try:
                response = await handler(request, context)
            except _Abort as exc:
                metrics.workload_requests.labels(name, exc.code.name).inc()
                self._log_refusal(name, context, exc)
                await context.abort(exc.code, exc.detail)
            metrics.workload_requests.labels(name, "OK").inc()
            return response

        return run

    # -- logs --------------------------------------------------------------------------------

    def _log_refusal(self, method: str, context: Context, exc: _Abort) -> None:
        credentials = self.peers.lookup(context.peer())
        # UNAVAILABLE (first sync or attestation still pending) is retried by every client:
        # worth seeing when debugging, not a refusal anyone must act on.
        level = logging.INFO if exc.code == grpc.StatusCode.UNAVAILABLE else logging.WARNING
        log.log(
            level,
            "workload-api-refused",
            extra={
                "fields": {
                    "method": method,
                    "code": exc.code.name,
                    "reason": exc.detail,
                    **_caller_fields(credentials),
                }
            },
        )

    @staticmethod
    def _log_issued(event: str, caller: _Caller, spiffe_ids: Sequence[str], **more: object) -> None:
        fields = {"spiffe_ids": list(spiffe_ids), **_caller_fields(caller.credentials), **more}
        log.info(event, extra={"fields": fields})

    # -- common steps ----------------------------------------------------------------------

    @staticmethod
    def _check_header(context: Context) -> None:
        for key, value in context.invocation_metadata() or ():
            if key == HEADER_KEY and value == HEADER_VALUE:
                return
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    def _attest(self, context: Context) -> _Caller:
        credentials = self.peers.lookup(context.peer())
        if credentials is None:
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, "caller could not be attested")
        try:
            attributes = self.attestor.attest(credentials)
        except AttestationPending:
            raise  # not known yet, which is not "not attestable": ``_attest_by`` waits
        except AttestationError as exc:
            raise self._refused(credentials, exc) from exc
        return _Caller(credentials, attributes.selectors())

    @staticmethod
    def _refused(credentials: PeerCredentials, exc: AttestationError) -> _Abort:
        # Logged with the caller's pid/uid by the method's wrapper (`_log_refusal`).
        return _Abort(grpc.StatusCode.PERMISSION_DENIED, f"caller could not be attested: {exc}")

    def _still_connected(self, caller: _Caller) -> None:
        """Before a stream sends again: the caller is still what connected (see above)."""
        try:
            self.attestor.verify(caller.credentials)
        except AttestationError as exc:
            raise self._refused(caller.credentials, exc) from exc

    def _deadline(self, context: Context) -> float:
        """Loop time until which this call may wait for the agent to be able to answer."""
        budget = self.config.sync_wait
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining - DEADLINE_MARGIN)
        return asyncio.get_running_loop().time() + max(0.0, budget)

    async def _attest_by(self, context: Context, deadline: float) -> _Caller:
        loop = asyncio.get_running_loop()
        while True:
            try:
                return self._attest(context)
            except AttestationPending as exc:
                left = deadline - loop.time()
                if left <= 0:
                    raise _Abort(
                        grpc.StatusCode.UNAVAILABLE, f"attestation pending: {exc}"
                    ) from exc
                # Polled: what it waits for (a pod watch event) has no signal of its own here.
                await asyncio.sleep(min(ATTESTATION_RETRY, left))

    async def _synced_by(self, deadline: float) -> None:
        synced = self.rotator.synced
        if synced.is_set():
            return
        left = deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(synced.wait(), max(0.0, left))
        except TimeoutError:
            raise _Abort(
                grpc.StatusCode.UNAVAILABLE,
                "the agent has not completed its first sync with the CA yet; retry shortly",
            ) from None

    def _entries(self, caller: _Caller) -> list[RegistrationEntry]:
        return self.matcher.match(self.rotator.cache.entries.values(), caller.selectors)

    def _identified(self, caller: _Caller) -> list[RegistrationEntry]:
        entries = self._entries(caller)
        if not entries:
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        return entries

    async def _admit(self, context: Context, *, verifier: bool = False) -> _Caller:
        self._check_header(context)
        deadline = self._deadline(context)
        caller = await self._attest_by(context, deadline)
        # Only now may "no entry" mean "no identity": before the first sync none is known.
        await self._synced_by(deadline)
        if not (verifier and self.config.allow_unauthenticated_verifiers):
            self._identified(caller)
        return caller

    def _federated_for(self, entries: Sequence[RegistrationEntry]) -> dict[TrustDomain, bytes]:
        cache = self.rotator.cache
        found = {}
        for entry in entries:
            for td in entry.federates_with:
                bundle = cache.federated.get(td)
                if bundle is not None:
                    found[td] = _der_certs(bundle)
        return found

    # -- X509 -------------------------------------------------------------------------------

    def _x509_response(
        self, entries: Sequence[RegistrationEntry]
    ) -> workload_pb2.X509SVIDResponse | None:
        cache = self.rotator.cache
        cached = cache.svids_for(entries)
        if not cached:
            return None
        bundles = {td: _der_certs(b) for td, b in cache.trust_bundles().items()}
        response = workload_pb2.X509SVIDResponse()
        for svid in cached:
            message = response.svids.add()
            message.spiffe_id = str(svid.entry.spiffe_id)
            message.x509_svid = svid.chain_der
            message.x509_svid_key = svid.key_der
            message.bundle = bundles.get(svid.entry.spiffe_id.trust_domain, b"")
            message.hint = svid.entry.hint  # "" (the proto3 default) when the entry has none
        for td, der in self._federated_for(entries).items():
            response.federated_bundles[td.id_string()] = der
        return response

    async def fetch_x509_svid(
        self, request: workload_pb2.X509SVIDRequest, context: Context
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        caller = await self._admit(context)
        rotator = self.rotator
        last: bytes | None = None
        first = True
        loop = asyncio.get_running_loop()
        grace_until = loop.time() + FIRST_RESPONSE_GRACE
        while True:
            version = rotator.cache.version
            self._still_connected(caller)
            entries = self._identified(caller)
            response = self._x509_response(entries)
            complete = response is not None and len(response.svids) == len(entries)
            if response is not None and (complete or not first or loop.time() >= grace_until):
                payload = response.SerializeToString(deterministic=True)
                if payload != last:
                    last = payload
                    first = False
                    self._log_issued(
                        "x509-svid-sent", caller, [svid.spiffe_id for svid in response.svids]
                    )
                    yield response
            if first:
                remaining = grace_until - loop.time()
                if remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):  # see Rotator._sleep
                            await rotator.wait_for_change(version)
                    continue
            await rotator.wait_for_change(version)

    async def fetch_x509_bundles(
        self, request: workload_pb2.X509BundlesRequest, context: Context
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        caller = await self._admit(context, verifier=True)
        last: bytes | None = None
        while True:
            version = self.rotator.cache.version
            self._still_connected(caller)
            entries = self._entries(caller)
            if not entries and not self.config.allow_unauthenticated_verifiers:
                raise _Abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            response = workload_pb2.X509BundlesResponse()
            own = self.rotator.cache.bundle
            if own is not None:
                response.bundles[own.trust_domain.id_string()] = _der_certs(own)
            for td, der in self._federated_for(entries).items():
                response.bundles[td.id_string()] = der
            payload = response.SerializeToString(deterministic=True)
            if response.bundles and payload != last:
                last = payload
                yield response
            await self.rotator.wait_for_change(version)

    # -- JWT --------------------------------------------------------------------------------

    async def fetch_jwt_svid(
        self, request: workload_pb2.JWTSVIDRequest, context: Context
    ) -> workload_pb2.JWTSVIDResponse:
        audience = list(request.audience)
        if not audience:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if len(audience) > MAX_AUDIENCES or any(
            not a or len(a) > MAX_AUDIENCE_LENGTH for a in audience
        ):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_AUDIENCES} non-empty audiences of {MAX_AUDIENCE_LENGTH} bytes",
            )
        caller = await self._admit(context)
        entries = self._identified(caller)
        if request.spiffe_id:
            try:
                wanted = SpiffeId(request.spiffe_id)
            except SpiffeIdError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            entries = [e for e in entries if e.spiffe_id == wanted]
            if not entries:
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"no identity issued for {wanted}",
                )
        response = workload_pb2.JWTSVIDResponse()
        for entry in entries:
            try:
                token = await self.rotator.jwt_svid(entry, audience)
            except UpstreamRefused as exc:
                raise _Abort(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from exc
            except UpstreamError as exc:
                raise _Abort(
                    grpc.StatusCode.UNAVAILABLE, f"could not obtain a JWT-SVID: {exc}"
                ) from exc
            message = response.svids.add()
            message.spiffe_id = str(token.spiffe_id)
            message.svid = token.token
        self._log_issued(
            "jwt-svid-issued", caller, [m.spiffe_id for m in response.svids], audience=audience
        )
        return response

    def _trust_bundles_for(
        self, entries: Sequence[RegistrationEntry]
    ) -> dict[TrustDomain, TrustBundle]:
        """The own bundle plus the federated ones the caller's entries federate with (a
        workload that federates with nobody must not trust, or validate for, a partner)."""
        cache = self.rotator.cache
        found = {
            td: cache.federated[td]
            for entry in entries
            for td in entry.federates_with
            if td in cache.federated
        }
        if cache.bundle is not None:
            found[cache.bundle.trust_domain] = cache.bundle
        return found

    def _jwt_bundles(self, entries: Sequence[RegistrationEntry]) -> dict[str, bytes]:
        return {
            td.id_string(): bundle.jwks_json()
            for td, bundle in self._trust_bundles_for(entries).items()
        }

    async def fetch_jwt_bundles(
        self, request: workload_pb2.JWTBundlesRequest, context: Context
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        caller = await self._admit(context, verifier=True)
        last: bytes | None = None
        while True:
            version = self.rotator.cache.version
            self._still_connected(caller)
            if not self._entries(caller) and not self.config.allow_unauthenticated_verifiers:
                raise _Abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            response = workload_pb2.JWTBundlesResponse(
                bundles=self._jwt_bundles(self._entries(caller))
            )
            payload = response.SerializeToString(deterministic=True)
            if response.bundles and payload != last:
                last = payload
                yield response
            await self.rotator.wait_for_change(version)

    async def validate_jwt_svid(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: Context
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        if not request.audience:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        caller = await self._admit(context, verifier=True)
        bundles = self._trust_bundles_for(self._entries(caller))

        def keys(td: TrustDomain) -> dict[str, PublicKey] | None:
            bundle = bundles.get(td)
            return dict(bundle.jwt_authorities) if bundle is not None else None

        try:
            svid = validate_jwt_svid(request.svid, request.audience, keys, now=self.rotator.clock())
        except JwtSvidError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        response = workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id))
        response.claims.update(dict(svid.claims))
        return response
