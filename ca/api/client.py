"""``CaClient``: the node agent's side of the ``trellis.ca.v1.CaService`` API (asyncio).

Typical agent lifecycle::

    from ca.api import CaClient, CaError

    bundle_pem = Path("ca/root.crt").read_bytes()          # bootstrap trust, out of band
    client = CaClient("127.0.0.1:8081", attest_address="127.0.0.1:8082",
                      trust_roots=bundle_pem)
    identity = await client.attest_with_join_token(token)    # or attest_with_psat(jwt)
    # identity.node_name, identity.svid (X509Svid with its private key), identity.bundle

    entries = await client.fetch_entries()                   # EntrySet for this node
    svids = await client.batch_new_x509_svids(
        [(entry.entry_id, generate_private_key(KeyAlgorithm.P256)) for entry in entries]
    )                                                        # X509Svid, request order
    jwt = await client.new_jwt_svid(entry.entry_id, ["audience"])
    await client.renew()                                     # at half the agent SVID's life
    async for bundle in client.watch_bundle():               # TrustBundle now + each change
        ...
    await client.close()

Restarting agents that kept their agent SVID on disk skip attestation with
``CaClient(..., agent_svid=X509Svid(..., private_key=key))``.

Every failure is a ``CaError`` carrying the gRPC status code name (``code``) and whether a
retry with backoff makes sense (``retryable``): UNAVAILABLE, DEADLINE_EXCEEDED and
RESOURCE_EXHAUSTED (rate limited) are; UNAUTHENTICATED, PERMISSION_DENIED and
INVALID_ARGUMENT are not (the agent must re-attest, drop the entry or fix its request).

Workload X509-SVIDs travel over one long-lived ``StreamX509SVIDs`` stream per client (a
message on it costs the CA about a third of a unary call); a CA without that method
(UNIMPLEMENTED) is asked with unary ``BatchNewX509SVID`` calls instead, from then on.
A broken stream fails the requests it carried (with the stream's status: a retry opens a
new one); a refused batch fails alone, as its unary call would have.

Transport: the main address is mutual TLS (the agent SVID is the client certificate); the
attestation address is server-authenticated TLS, used only by ``attest_*``. The server is
authenticated by ``trust_roots`` and the DNS name ``trellis-ca`` that only the CA's own
certificate may carry (entries cannot request it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.api._proto import ca_pb2
from ca.api.convert import SERVICE, bundle_from_proto, entry_from_proto, svid_from_proto
from ca.api.csr import build_csr
from ca.api.errors import CaError
from ca.api.signing_stream import SigningStream
from ca.api.values import AgentIdentity, BundleUpdate, JwtSvidToken
from ca.bundle import BundleError, TrustBundle
from ca.entries import EntryError, EntrySet
from ca.keys import KeyAlgorithm, KeyMaterialError, PrivateKey, generate_private_key
from ca.spiffeid import SpiffeId
from ca.x509svid import X509Svid

__all__ = ["DEFAULT_SERVER_NAME", "MAX_MESSAGE_BYTES", "CaClient"]

DEFAULT_SERVER_NAME = "trellis-ca"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

Resp = TypeVar("Resp")

_STATUS_BY_NUMBER = {status.value[0]: status for status in grpc.StatusCode}


def _pem_roots(trust_roots: bytes | TrustBundle | Sequence[x509.Certificate]) -> bytes:
    if isinstance(trust_roots, bytes):
        return trust_roots
    certs = trust_roots.x509_authorities if isinstance(trust_roots, TrustBundle) else trust_roots
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


# grpcio's BoringSSL keeps the client's whole chain in each of the two TLS 1.3 tickets a
# gRPC server sends, and writes them through a 17 KB buffer: with a chain past about 8 KB
# the server's first write fails (SSL_ERROR_WANT_WRITE, "Wrap failed", grpc/grpc#17340).
# An ML-DSA-65 chain is 9 KB (a 3,309-byte signature on each certificate, FIPS 204).
MAX_PRESENTED_CHAIN_BYTES = 6 * 1024


def presented_chain_pem(svid: X509Svid) -> bytes:
    """The chain an agent presents to the CA: all of it, or, when it is too large for
    grpc's buffers, the leaf alone (the CA trusts its own intermediate for it)."""
    if sum(len(der) for der in svid.chain_der()) <= MAX_PRESENTED_CHAIN_BYTES:
        return svid.chain_pem()
    return svid.leaf.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CaClient:
    """Async client for one CA server. Not thread-safe; use from one event loop.

    ``address`` is the mutual-TLS listener (``--listen``), ``attest_address`` the
    attestation listener (``--attest-listen``; only needed before the first identity).
    ``trust_roots`` are the trust domain's roots (PEM bytes, a ``TrustBundle`` or
    certificates); bundles received later do not replace them automatically: call
    ``set_trust_roots`` after a root rotation.
    """

    def __init__(
        self,
        address: str,
        *,
        trust_roots: bytes | TrustBundle | Sequence[x509.Certificate],
        attest_address: str | None = None,
        agent_svid: X509Svid | None = None,
        server_name: str = DEFAULT_SERVER_NAME,
        timeout: float = 10.0,
        key_algorithm: KeyAlgorithm = KeyAlgorithm.P256,
    ) -> None:
        if agent_svid is not None and agent_svid.private_key is None:
            raise ValueError("agent_svid needs its private key")
        self.address = address
        self.attest_address = attest_address
        self.server_name = server_name
        self.timeout = timeout
        self.key_algorithm = key_algorithm
        self._roots_pem = _pem_roots(trust_roots)
        self._identity: X509Svid | None = agent_svid
        self._node_name: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._retired: list[grpc.aio.Channel] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self._stream: SigningStream | None = None
        # False once the CA has answered StreamX509SVIDs with UNIMPLEMENTED.
        self.signing_stream = True
        self.max_batch: int | None = None
        # The CA's workload key type, learnt from every FetchEntries (None: not set there).
        self.workload_key_type: KeyAlgorithm | None = None

    # -- state -------------------------------------------------------------------------

    def _learn_workload_key_type(self, advertised: str) -> None:
        try:
            self.workload_key_type = KeyAlgorithm.parse(advertised) if advertised else None
        except KeyMaterialError:
            self.workload_key_type = None  # a newer CA's type this agent cannot make

    def _learn_max_batch(self, advertised: int) -> None:
        # 0: a CA from before the field, which says nothing; keep what we knew.
        if advertised > 0:
            self.max_batch = advertised

    @property
    def agent_svid(self) -> X509Svid | None:
        """The current agent SVID (with its private key), or None before attestation."""
        return self._identity

    def set_trust_roots(
        self, trust_roots: bytes | TrustBundle | Sequence[x509.Certificate]
    ) -> None:
        self._roots_pem = _pem_roots(trust_roots)
        self._retire_channel()

    async def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        channels = [*self._retired, *([self._channel] if self._channel else [])]
        self._retired, self._channel = [], None
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> CaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.ssl_target_name_override", self.server_name),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 60_000),
        ]

    def _main_channel(self) -> grpc.aio.Channel:
        if self._closed:
            raise CaError(grpc.StatusCode.CANCELLED, "the client has been closed")
        if self._channel is None:
            svid = self._identity
            if svid is None or svid.private_key is None:
                raise CaError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "no agent SVID yet: call attest_with_join_token or attest_with_psat first",
                )
            credentials = grpc.ssl_channel_credentials(
                self._roots_pem, _key_pem(svid.private_key), presented_chain_pem(svid)
            )
            self._channel = grpc.aio.secure_channel(self.address, credentials, self._options())
        return self._channel

    def _retire_channel(self) -> None:
        # Streams opened on the old channel (WatchBundle) keep running until the channel
        # before it is closed at the next swap; new calls use the new credentials at once.
        if self._stream is not None:
            self._stream.retire()  # its requests in flight still get their answers
            self._stream = None
        if self._channel is not None:
            self._retired.append(self._channel)
            self._channel = None
        while len(self._retired) > 1:
            old = self._retired.pop(0)
            # close() is a coroutine; schedule it, the old streams get CANCELLED.
            task = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _unary(
        self,
        channel: grpc.aio.Channel,
        method: str,
        request: Any,
        response_type: type[Resp],
    ) -> Resp:
        call: grpc.aio.UnaryUnaryMultiCallable[Any, Resp] = channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,  # type: ignore[attr-defined]
        )
        try:
            response: Resp = await call(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise CaError(exc.code(), exc.details() or "") from exc
        return response

    # -- attestation -------------------------------------------------------------------

    async def _attest(
        self, request: ca_pb2.AttestAgentRequest, key: PrivateKey | None
    ) -> AgentIdentity:
        key = key or generate_private_key(self.key_algorithm)
        request.csr = build_csr(key)
        credentials = grpc.ssl_channel_credentials(self._roots_pem)
        address = self.attest_address
        if address is None:
            raise ValueError(
                "CaClient(attest_address=...) is needed to attest: the server's --attest-listen"
            )
        async with grpc.aio.secure_channel(address, credentials, self._options()) as channel:
            response = await self._unary(
                channel, "AttestAgent", request, ca_pb2.AttestAgentResponse
            )
        identity = self._accept(response.node_name, response.svid, response.bundle, key)
        self._learn_max_batch(response.max_batch)
        return identity

    def _accept(
        self, node: str, svid_msg: ca_pb2.X509SVID, bundle_msg: ca_pb2.Bundle, key: PrivateKey
    ) -> AgentIdentity:
        try:
            svid = svid_from_proto(svid_msg, key)
            bundle = bundle_from_proto(bundle_msg)
        except (ValueError, BundleError) as exc:
            raise CaError(grpc.StatusCode.INTERNAL, f"CA sent an unreadable SVID: {exc}") from exc
        self._identity = svid
        self._node_name = node or self._node_name
        self._retire_channel()
        return AgentIdentity(self._node_name or "", svid, bundle)

    async def attest_with_join_token(
        self, token: str, *, key: PrivateKey | None = None
    ) -> AgentIdentity:
        """Redeem a single-use join token; the client then holds the agent SVID."""
        request = ca_pb2.AttestAgentRequest(join_token=ca_pb2.JoinTokenAttestation(token=token))
        return await self._attest(request, key)

    async def attest_with_psat(self, token: str, *, key: PrivateKey | None = None) -> AgentIdentity:
        """Attest with a projected service-account token (audience ``trellis-ca``)."""
        request = ca_pb2.AttestAgentRequest(k8s_psat=ca_pb2.K8sPsatAttestation(token=token))
        return await self._attest(request, key)

    async def renew(self, *, key: PrivateKey | None = None) -> AgentIdentity:
        """A fresh agent SVID (new key unless given), authenticated by the current one."""
        key = key or generate_private_key(self.key_algorithm)
        request = ca_pb2.RenewAgentRequest(csr=build_csr(key))
        response = await self._unary(
            self._main_channel(), "RenewAgent", request, ca_pb2.RenewAgentResponse
        )
        node = self._node_name or self._node_from_svid(response.svid.spiffe_id)
        identity = self._accept(node, response.svid, response.bundle, key)
        self._learn_max_batch(response.max_batch)
        return identity

    @staticmethod
    def _node_from_svid(spiffe_id: str) -> str:
        return spiffe_id.rsplit("/", 1)[-1]

    # -- workload identities -----------------------------------------------------------

    async def batch_sign_csrs(self, requests: Sequence[tuple[str, bytes]]) -> list[X509Svid]:
        """Sign DER CSRs for ``(entry_id, csr)`` pairs; SVIDs come back without keys.

        One call, however many pairs: a CA refuses more than ``max_batch`` (learnt from
        attestation, renewal or FetchEntries) with RESOURCE_EXHAUSTED. ``GrpcUpstream``
        splits to fit.
        """
        message = ca_pb2.BatchNewX509SVIDRequest(
            requests=[ca_pb2.X509SVIDRequest(entry_id=e, csr=c) for e, c in requests]
        )
        if self.signing_stream:
            try:
                answer = await self._signing_stream().request(message, self.timeout)
            except CaError as exc:
                if exc.status is not grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self.signing_stream = False  # a CA from before the stream
            else:
                if answer.code:
                    status = _STATUS_BY_NUMBER.get(answer.code, grpc.StatusCode.UNKNOWN)
                    raise CaError(status, answer.detail)
                return [svid_from_proto(s, None) for s in answer.svids]
        response = await self._unary(
            self._main_channel(), "BatchNewX509SVID", message, ca_pb2.BatchNewX509SVIDResponse
        )
        return [svid_from_proto(s, None) for s in response.svids]

    def _signing_stream(self) -> SigningStream:
        channel = self._main_channel()
        if self._stream is None or self._stream.broken is not None:
            self._stream = SigningStream(channel)
        return self._stream

    async def batch_new_x509_svids(
        self, requests: Sequence[tuple[str, PrivateKey]]
    ) -> list[X509Svid]:
        """X509-SVIDs for ``(entry_id, private_key)`` pairs, in request order, keys attached.

        All or nothing: PERMISSION_DENIED if any entry is not for this node (re-fetch the
        entries), INVALID_ARGUMENT for an unusable key.
        """
        signed = await self.batch_sign_csrs([(e, build_csr(k)) for e, k in requests])
        return [
            X509Svid(s.spiffe_id, s.chain, key)
            for s, (_, key) in zip(signed, requests, strict=True)
        ]

    async def new_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> JwtSvidToken:
        response = await self._unary(
            self._main_channel(),
            "NewJWTSVID",
            ca_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=list(audience)),
            ca_pb2.NewJWTSVIDResponse,
        )
        return JwtSvidToken(
            SpiffeId(response.spiffe_id),
            response.token,
            dt.datetime.fromtimestamp(response.expires_at, dt.UTC),
        )

    async def fetch_entries(self) -> EntrySet:
        """The entries that may run on this agent's node (``EntrySet.revision`` for diffs)."""
        response = await self._unary(
            self._main_channel(),
            "FetchEntries",
            ca_pb2.FetchEntriesRequest(),
            ca_pb2.FetchEntriesResponse,
        )
        self._learn_max_batch(response.max_batch)
        self._learn_workload_key_type(response.workload_key_type)
        try:
            return EntrySet(tuple(entry_from_proto(e) for e in response.entries))
        except EntryError as exc:
            raise CaError(grpc.StatusCode.INTERNAL, f"CA sent an unreadable entry: {exc}") from exc

    async def watch_bundle(self) -> AsyncIterator[TrustBundle]:
        """The trust bundle at once, then on every change. Ends only by raising ``CaError``
        (e.g. UNAVAILABLE when the CA goes away: back off and call again) or when closed."""
        async for update in self.watch_bundles():
            yield update.bundle

    async def watch_bundles(self) -> AsyncGenerator[BundleUpdate, None]:
        """Like ``watch_bundle``, with the federated trust domains' bundles alongside (a
        message is also sent when only those change)."""
        while not self._closed:
            channel = self._main_channel()
            call: grpc.aio.UnaryStreamMultiCallable[Any, ca_pb2.Bundle] = channel.unary_stream(
                f"/{SERVICE}/WatchBundle",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=ca_pb2.Bundle.FromString,
            )
            stream = call(ca_pb2.WatchBundleRequest())
            try:
                async for message in stream:
                    try:
                        update = BundleUpdate(
                            bundle_from_proto(message),
                            tuple(bundle_from_proto(f) for f in message.federated),
                        )
                    except (BundleError, ValueError) as exc:
                        raise CaError(
                            grpc.StatusCode.INTERNAL, f"CA sent an unreadable bundle: {exc}"
                        ) from exc
                    yield update
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and self._channel is not channel:
                    continue  # our own channel swap after renewal: resume on the new one
                raise CaError(exc.code(), exc.details() or "") from exc
            except asyncio.CancelledError:
                # Closing a retired channel cancels its calls "locally"; unless this task
                # itself is being cancelled, that was our own swap: resume on the new one.
                task = asyncio.current_task()
                if (task is not None and task.cancelling()) or self._channel is channel:
                    raise
                continue
            finally:
                stream.cancel()
            if self._channel is channel:
                raise CaError(grpc.StatusCode.UNAVAILABLE, "bundle stream ended")

    async def watch_stek_rings(self) -> AsyncGenerator[ca_pb2.STEKRings, None]:
        """The STEK rings of this node's identities now and on every change, as the CA sent
        them (``ca.agent.stek`` reads them). Ends as ``watch_bundles`` does."""
        while not self._closed:
            channel = self._main_channel()
            call: grpc.aio.UnaryStreamMultiCallable[Any, ca_pb2.STEKRings] = channel.unary_stream(
                f"/{SERVICE}/WatchSTEKRings",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=ca_pb2.STEKRings.FromString,
            )
            stream = call(ca_pb2.WatchSTEKRingsRequest())
            try:
                async for message in stream:
                    yield message
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and self._channel is not channel:
                    continue  # our own channel swap after renewal: resume on the new one
                raise CaError(exc.code(), exc.details() or "") from exc
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if (task is not None and task.cancelling()) or self._channel is channel:
                    raise
                continue
            finally:
                stream.cancel()
            if self._channel is channel:
                raise CaError(grpc.StatusCode.UNAVAILABLE, "STEK stream ended")
