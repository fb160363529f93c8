"""``Upstream`` over gRPC: the agent's view of ``trellis ca serve`` through ``CaClient``.

A thin adapter: it chooses the node attestation method (join token or Kubernetes
projected service-account token), and translates ``CaError`` at the boundary into the
agent's two kinds of failure (``UpstreamUnavailable`` when a retry can help,
``UpstreamRefused`` when it cannot).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from ca.agent.upstream import UpstreamError, UpstreamRefused, UpstreamUnavailable
from ca.bundle import TrustBundle
from ca.keys import PrivateKey
from ca.server.client import AgentIdentity, CaClient, CaError, JwtSvidToken
from ca.server.entries import EntrySet
from ca.x509svid import X509Svid

__all__ = ["GrpcUpstream"]


def _translate(exc: CaError) -> UpstreamError:
    kind = UpstreamUnavailable if exc.retryable else UpstreamRefused
    return kind(exc.code.lower().replace("_", "-"), str(exc))


class GrpcUpstream:
    def __init__(
        self,
        client: CaClient,
        *,
        join_token: str | None = None,
        psat_token_path: Path | None = None,
    ) -> None:
        self.client = client
        self._join_token = join_token
        self._psat_path = psat_token_path

    @property
    def agent_svid(self) -> X509Svid | None:
        return self.client.agent_svid

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
            raise _translate(exc) from exc

    async def renew(self) -> AgentIdentity:
        try:
            return await self.client.renew()
        except CaError as exc:
            raise _translate(exc) from exc

    async def fetch_entries(self) -> EntrySet:
        try:
            return await self.client.fetch_entries()
        except CaError as exc:
            raise _translate(exc) from exc

    async def batch_new_x509_svids(
        self, requests: Sequence[tuple[str, PrivateKey]]
    ) -> list[X509Svid]:
        try:
            return await self.client.batch_new_x509_svids(requests)
        except CaError as exc:
            raise _translate(exc) from exc

    async def new_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> JwtSvidToken:
        try:
            return await self.client.new_jwt_svid(entry_id, audience)
        except CaError as exc:
            raise _translate(exc) from exc

    async def watch_bundle(self) -> AsyncIterator[TrustBundle]:
        try:
            async for bundle in self.client.watch_bundle():
                yield bundle
        except CaError as exc:
            raise _translate(exc) from exc

    async def close(self) -> None:
        await self.client.close()
