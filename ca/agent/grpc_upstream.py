"""``Upstream`` over gRPC: the agent's view of ``trellis ca serve`` through ``CaClient``.

A thin adapter: it chooses the node attestation method (join token or Kubernetes
projected service-account token), and translates ``CaError`` at the boundary into the
agent's two kinds of failure (``UpstreamUnavailable`` when a retry can help,
``UpstreamRefused`` when it cannot).

After an UNAVAILABLE it replaces the client (and so the gRPC channel) with a fresh one
holding the same agent SVID. Why: a grpcio channel whose server went away backs off its
own reconnection attempts (1 s growing by 1.6x towards 120 s) and fails calls fast
meanwhile, so a CA that comes back would stay unreached long after the agent's own capped
backoff says "retry now"; SVIDs could expire in that gap. A new channel connects at once.

The CA tells the client how many CSRs it accepts in one BatchNewX509SVID call
(``CaClient.max_batch``, from attestation, renewal and every FetchEntries);
``batch_new_x509_svids`` splits the agent's batches to fit. Without that, a CA started
with ``--max-batch`` below the agent's batch size would refuse the batch with
RESOURCE_EXHAUSTED -- a retryable code, so the same oversized batch would go out again
after every backoff, forever.

When the bundle's X.509 roots change (root rotation), the client is told to trust the new
set (``CaClient.set_trust_roots``) and later clients are built with it, so the agent
keeps reaching a CA whose certificate chains to the new root.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from ca.agent.upstream import UpstreamError, UpstreamRefused, UpstreamUnavailable
from ca.api import AgentIdentity, BundleUpdate, CaClient, CaError, JwtSvidToken
from ca.api._proto import ca_pb2
from ca.bundle import TrustBundle
from ca.entries import EntrySet
from ca.keys import KeyAlgorithm, PrivateKey
from ca.x509svid import X509Svid

__all__ = ["GrpcUpstream"]


ClientFactory = Callable[[X509Svid | None, TrustBundle], CaClient]


class GrpcUpstream:
    def __init__(
        self,
        factory: ClientFactory,
        trust_roots: TrustBundle,
        *,
        agent_svid: X509Svid | None = None,
        join_token: str | None = None,
        psat_token_path: Path | None = None,
    ) -> None:
        self._factory = factory
        self.trust_roots = trust_roots
        self.client = factory(agent_svid, trust_roots)
        self._join_token = join_token
        self._psat_path = psat_token_path
        self._closing: set[asyncio.Task[None]] = set()
        self.reconnects = 0

    def _translate(self, exc: CaError, used: CaClient | None = None) -> UpstreamError:
        if not exc.retryable:
            return UpstreamRefused(exc.code.lower().replace("_", "-"), str(exc))
        # Calls overlap (a signing call, workloads' JWT-SVID calls, a caller's own
        # Batcher with several in flight): only the first failure from a channel
        # replaces it; later ones must not discard its successor.
        if exc.code == "UNAVAILABLE" and (used is None or used is self.client):
            old = self.client
            self.client = self._factory(old.agent_svid, self.trust_roots)
            self.client.max_batch = old.max_batch  # the same CA; a restart re-tells it
            self.reconnects += 1
            task = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return UpstreamUnavailable(exc.code.lower().replace("_", "-"), str(exc))

    @property
    def agent_svid(self) -> X509Svid | None:
        return self.client.agent_svid

    @property
    def workload_key_type(self) -> KeyAlgorithm | None:
        return self.client.workload_key_type

    @property
    def attestation_method(self) -> str:
        """How this agent attests when it has no valid SVID, named as the CA logs it."""
        if self._psat_path is not None:
            return "k8s_psat"
        if self._join_token is not None:
            return "join_token"
        return "none (renews the agent SVID from its data directory)"

    async def attest(self) -> AgentIdentity:
        try:
            if self._psat_path is not None:
                try:
                    token = self._psat_path.read_text().strip()
                except OSError as exc:
                    raise UpstreamUnavailable(
                        "psat-unreadable", f"cannot read {self._psat_path}: {exc.strerror}"
                    ) from exc
                return await self.client.attest_with_psat(token)
            if self._join_token is None:
                raise UpstreamRefused(
                    "no-attestation-method",
                    "no valid agent SVID in the data directory and no join token or "
                    "service-account token to attest with",
                )
            return await self.client.attest_with_join_token(self._join_token)
        except CaError as exc:
            raise self._translate(exc) from exc

    async def renew(self) -> AgentIdentity:
        try:
            return await self.client.renew()
        except CaError as exc:
            raise self._translate(exc) from exc

    async def fetch_entries(self) -> EntrySet:
        try:
            return await self.client.fetch_entries()
        except CaError as exc:
            raise self._translate(exc) from exc

    async def batch_new_x509_svids(
        self, requests: Sequence[tuple[str, PrivateKey]]
    ) -> list[X509Svid]:
        client = self.client
        limit = client.max_batch
        chunks = (
            [requests[start : start + limit] for start in range(0, len(requests), limit)]
            if limit is not None and len(requests) > limit
            else [requests]
        )
        signed: list[X509Svid] = []
        try:
            # One call after another: the batcher already keeps the CA's per-call cost low,
            # and a refused chunk fails the whole batch as a single call would have.
            for chunk in chunks:
                signed += await client.batch_new_x509_svids(chunk)
        except CaError as exc:
            raise self._translate(exc, client) from exc
        return signed

    async def new_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> JwtSvidToken:
        try:
            return await self.client.new_jwt_svid(entry_id, audience)
        except CaError as exc:
            raise self._translate(exc) from exc

    async def watch_bundle(self) -> AsyncIterator[BundleUpdate]:
        try:
            async for update in self.client.watch_bundles():
                bundle = update.bundle
                roots = {c.fingerprint(hashes.SHA256()) for c in bundle.x509_authorities}
                known = {c.fingerprint(hashes.SHA256()) for c in self.trust_roots.x509_authorities}
                if roots and roots != known:
                    # Only on a real change: set_trust_roots swaps the channel, and the
                    # watch resumes on the new one (re-sending this same bundle).
                    self.trust_roots = bundle
                    self.client.set_trust_roots(bundle)
                yield update
        except CaError as exc:
            raise self._translate(exc) from exc

    async def watch_stek_rings(self) -> AsyncIterator[ca_pb2.STEKRings]:
        """The CA's STEK rings for this node (``ca.agent.stek``): raw messages, parsed there."""
        try:
            async for message in self.client.watch_stek_rings():
                yield message
        except CaError as exc:
            raise self._translate(exc) from exc

    async def close(self) -> None:
        await self.client.close()
