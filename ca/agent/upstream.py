"""What the agent needs from its CA, as a small interface the agent declares itself.

``Upstream`` mirrors ``trellis.ca.v1.CaService`` (and ``ca.api.CaClient``):
attest once, renew the agent SVID, fetch the entries for this node, sign X509-SVIDs in
batches, sign JWT-SVIDs, and watch the bundle. Two implementations:

* ``InProcessUpstream`` signs with an ``IntermediateAuthority`` / ``JwtAuthority`` in the
  agent's own process: unit tests, and ``trellis agent --local-ca DIR`` for development.
* ``GrpcUpstream`` (``grpc_upstream.py``) talks to ``trellis ca serve`` through ``CaClient``.

Errors carry their meaning: ``UpstreamUnavailable`` is worth retrying with backoff (CA
down, network, rate limited); ``UpstreamRefused`` is not (bad join token, an entry that is
not for this node).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from ca.api import AgentIdentity, BundleUpdate, JwtSvidToken
from ca.authority import IntermediateAuthority, IssuanceError
from ca.bundle import TrustBundle
from ca.entries import EntrySet, EntrySource, RegistrationEntry
from ca.jwtsvid import JwtAuthority, JwtSvidError
from ca.keys import KeyAlgorithm, PrivateKey, generate_private_key
from ca.spiffeid import SpiffeId, TrustDomain
from ca.x509svid import X509Svid

__all__ = [
    "AgentIdentity",
    "BundleUpdate",
    "InProcessUpstream",
    "JwtSvidToken",
    "Upstream",
    "UpstreamError",
    "UpstreamRefused",
    "UpstreamUnavailable",
    "agent_spiffe_id",
]


log = logging.getLogger("trellis.agent.upstream")


class UpstreamError(Exception):
    """Base of upstream failures; ``reason`` is a short label for metrics and logs."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


class UpstreamUnavailable(UpstreamError):
    """Transient: the CA cannot be reached or asked us to slow down. Retry with backoff."""


class UpstreamRefused(UpstreamError):
    """The CA said no (bad token, not this node's entry, ...); retrying will not help."""


def agent_spiffe_id(trust_domain: TrustDomain, node: str) -> SpiffeId:
    return trust_domain.spiffe_id(f"/trellis/agent/{node}")


class Upstream(Protocol):
    @property
    def agent_svid(self) -> X509Svid | None:
        """The current agent SVID with its key (``None`` before attestation)."""

    async def attest(self) -> AgentIdentity: ...

    async def renew(self) -> AgentIdentity: ...

    async def fetch_entries(self) -> EntrySet: ...

    @property
    def workload_key_type(self) -> KeyAlgorithm | None:
        """The key type the CA wants workload keys of (learnt with the entries), if any."""

    async def batch_new_x509_svids(
        self, requests: Sequence[tuple[str, PrivateKey]]
    ) -> list[X509Svid]: ...

    async def new_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> JwtSvidToken: ...

    def watch_bundle(self) -> AsyncIterator[BundleUpdate]:
        """The bundle (with the federated ones) now and on every change of either."""
        ...

    async def close(self) -> None: ...


Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class InProcessUpstream:
    """An ``Upstream`` that signs in-process, applying the CA server's rules.

    Setting ``available = False`` makes every call raise ``UpstreamUnavailable`` (and ends
    bundle watches), which is how tests stop "the CA" without a process.
    """

    def __init__(
        self,
        intermediate: IntermediateAuthority,
        jwt_authority: JwtAuthority,
        bundle: TrustBundle,
        entries: EntrySet | Sequence[RegistrationEntry] | EntrySource,
        *,
        node: str,
        single_use_attestation: bool = False,
        agent_ttl: dt.timedelta = dt.timedelta(hours=1),
        clock: Clock = _utcnow,
    ) -> None:
        self._intermediate = intermediate
        self._jwt = jwt_authority
        self._bundle = bundle
        self._federated: tuple[TrustBundle, ...] = ()
        self._source: EntrySource | None = None
        if isinstance(entries, EntrySet):
            self._entries = entries
        elif isinstance(entries, Sequence):
            self._entries = EntrySet(tuple(entries))
        else:
            self._source = entries  # e.g. a YAML file re-read when it changes
            self._entries = entries.current()
        self._node = node
        self._single_use = single_use_attestation
        self._attested = False
        self._agent_ttl = agent_ttl
        self._clock = clock
        self._agent_svid: X509Svid | None = None
        self._bundle_changed = asyncio.Event()
        self._available = True
        self.calls: dict[str, int] = {}

    # -- controls for tests and local mode -----------------------------------------------

    @property
    def available(self) -> bool:
        return self._available

    @available.setter
    def available(self, value: bool) -> None:
        self._available = value
        self._bundle_changed.set()  # wake bundle watchers so they notice

    def set_entries(self, entries: EntrySet | Sequence[RegistrationEntry]) -> None:
        self._entries = entries if isinstance(entries, EntrySet) else EntrySet(tuple(entries))

    def set_bundle(self, bundle: TrustBundle) -> None:
        self._bundle = bundle
        self._bundle_changed.set()

    def set_federated(self, bundles: Sequence[TrustBundle]) -> None:
        self._federated = tuple(bundles)
        self._bundle_changed.set()

    @property
    def trust_domain(self) -> TrustDomain:
        return self._intermediate.trust_domain

    # -- Upstream --------------------------------------------------------------------------

    @property
    def agent_svid(self) -> X509Svid | None:
        return self._agent_svid

    def _enter(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if not self._available:
            raise UpstreamUnavailable("unavailable", "CA is unavailable")

    def _issue_agent(self) -> AgentIdentity:
        key = generate_private_key(KeyAlgorithm.P256)
        spiffe_id = agent_spiffe_id(self._intermediate.trust_domain, self._node)
        try:
            svid = self._intermediate.issue_x509_svid(
                spiffe_id, key.public_key(), now=self._clock(), ttl=self._agent_ttl,
                private_key=key,
            )  # fmt: skip
        except IssuanceError as exc:
            raise UpstreamRefused(exc.reason, str(exc)) from exc
        self._agent_svid = svid
        return AgentIdentity(self._node, svid, self._bundle)

    async def attest(self) -> AgentIdentity:
        self._enter("attest")
        if self._single_use and self._attested:
            raise UpstreamRefused("join-token-used", "join token was already used")
        self._attested = True
        return self._issue_agent()

    async def renew(self) -> AgentIdentity:
        self._enter("renew")
        if self._agent_svid is None:
            raise UpstreamRefused("unauthenticated", "no agent SVID: attest first")
        return self._issue_agent()

    @property
    def workload_key_type(self) -> KeyAlgorithm | None:
        return None  # in-process: the intermediate at hand says it (Rotator's auto)

    async def fetch_entries(self) -> EntrySet:
        self._enter("fetch_entries")
        if self._source is not None:
            error = self._source.refresh(time.time())
            if error is not None:
                log.warning("keeping the previous entries: %s", error)
            self._entries = self._source.current()
        return EntrySet(self._entries.for_node(self._node))

    def _entry(self, entry_id: str) -> RegistrationEntry:
        entry = self._entries.get(entry_id)
        if entry is None or not entry.runs_on(self._node):
            raise UpstreamRefused(
                "not-this-node", f"entry {entry_id} may not run on node {self._node}"
            )
        return entry

    async def batch_new_x509_svids(
        self, requests: Sequence[tuple[str, PrivateKey]]
    ) -> list[X509Svid]:
        self._enter("batch_new_x509_svids")
        entries = [self._entry(entry_id) for entry_id, _ in requests]  # all or nothing
        now = self._clock()
        signed = []
        for (_, key), entry in zip(requests, entries, strict=True):
            try:
                svid = self._intermediate.issue_x509_svid(
                    entry.spiffe_id,
                    key.public_key(),
                    now=now,
                    ttl=entry.x509_svid_ttl,
                    dns_names=entry.dns_names,
                    private_key=key,
                )
            except IssuanceError as exc:
                raise UpstreamRefused(exc.reason, str(exc)) from exc
            signed.append(svid)
        return signed

    async def new_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> JwtSvidToken:
        self._enter("new_jwt_svid")
        entry = self._entry(entry_id)
        try:
            svid = self._jwt.sign(
                entry.spiffe_id, audience, now=self._clock(), ttl=entry.jwt_svid_ttl
            )
        except JwtSvidError as exc:
            raise UpstreamRefused(exc.reason, str(exc)) from exc
        return JwtSvidToken(svid.spiffe_id, svid.token, svid.expiry)

    async def watch_bundle(self) -> AsyncIterator[BundleUpdate]:
        self._enter("watch_bundle")
        while True:
            self._bundle_changed.clear()
            yield BundleUpdate(self._bundle, self._federated)
            await self._bundle_changed.wait()
            if not self._available:
                raise UpstreamUnavailable("unavailable", "CA is unavailable")

    async def close(self) -> None:
        return None
