"""The CA service's decisions, apart from gRPC: who the caller is, what it may have.

``CaService`` takes Trellis values (``ca.api.values``: decoded by the gRPC shell), the
caller's node (already authenticated by ``authenticate``) and the time, and returns
Trellis values or raises ``Refusal`` carrying what kind of refusal it is and a metric
reason. Neither grpc nor protobuf appears here: ``grpc_shell.py`` converts messages at
the boundary (``ca.api.convert``) and turns each ``Refusal.kind`` into its gRPC status
code; TokenReview I/O hides behind ``TokenReviewer``.

Kinds (and the status codes the shell sends for them):

* NOT_AUTHENTICATED (UNAUTHENTICATED) — no client certificate, an agent SVID that does
  not verify or has expired, a forged/replayed/expired join token, a refused PSAT;
* NOT_PERMITTED (PERMISSION_DENIED) — an entry that does not exist or is not for the
  caller's node, a CSR naming a SPIFFE ID other than the entry's, a banned node (every
  call of its agent, and attestation for it: ``bans.py``);
* MALFORMED (INVALID_ARGUMENT) — a malformed CSR or one whose signature does not verify,
  a bad audience, an empty batch, no attestation data;
* OVER_LIMIT (RESOURCE_EXHAUSTED) — over the caller's rate limit, or a request above the
  size limits;
* AUTHORITY_EXPIRING (FAILED_PRECONDITION) — the intermediate has (nearly) expired;
* UNAVAILABLE (UNAVAILABLE) — PSAT attestation is not configured, TokenReview cannot be
  reached, the signing workers are gone;
* INCOMPLETE (INTERNAL) — the signer answered fewer CSRs than it was given.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from ca.api.values import (
    AgentSvid,
    AttestationRequest,
    JoinTokenProof,
    JwtSvidToken,
    NodeEntries,
    PsatProof,
    SignedSvid,
    SvidRequest,
)
from ca.authority import IntermediateAuthority, IssuanceError, load_csr
from ca.bundle import TrustBundle
from ca.entries import EntrySource, RegistrationEntry
from ca.jwtsvid import JwtAuthority, JwtSvidError
from ca.server.attestation import (
    PSAT_AUDIENCE,
    AttestationError,
    JoinTokenRegistry,
    TokenReviewResult,
    agent_spiffe_id,
    node_of_agent,
    psat_node_name,
)
from ca.server.metrics import CaMetrics
from ca.server.ratelimit import RateLimiter
from ca.server.signer import (
    InlineSigner,
    Signed,
    Signer,
    SignerUnavailable,
    SignFailure,
    SignRequest,
)
from ca.spiffeid import SpiffeId
from ca.verify import VerificationError, verify_x509_svid
from ca.x509svid import X509Svid

__all__ = [
    "AttestedAgent",
    "CaService",
    "Refusal",
    "RefusalKind",
    "ServiceConfig",
    "TokenReviewer",
    "log_event",
]

log = logging.getLogger("trellis.ca.server")

# Reasons of IssuanceError that mean "you asked for an identity you may not have".
_PERMISSION_REASONS = frozenset({"csr-spiffe-id-mismatch", "foreign-trust-domain"})


def log_event(level: int, event: str, **fields: object) -> None:
    """One structured log line. Callers pass names, reasons and IDs, never key material."""
    log.log(level, event, extra={"fields": fields})


class RefusalKind(enum.Enum):
    """Why a request is refused, as the caller must act on it (see the module docstring)."""

    NOT_AUTHENTICATED = "not-authenticated"
    NOT_PERMITTED = "not-permitted"
    MALFORMED = "malformed"
    OVER_LIMIT = "over-limit"
    AUTHORITY_EXPIRING = "authority-expiring"
    UNAVAILABLE = "unavailable"
    INCOMPLETE = "incomplete"


class Refusal(Exception):
    """A request the CA refuses: its kind, a metric reason, a message for the caller."""

    def __init__(self, kind: RefusalKind, reason: str, detail: str) -> None:
        self.kind = kind
        self.reason = reason
        self.detail = detail
        super().__init__(f"{kind.name} [{reason}]: {detail}")


@dataclass(frozen=True, slots=True)
class AttestedAgent:
    """An agent holding an unexpired SVID from this server, for ``trellis ca agents list``.

    ``method`` is how it attested (``join_token``, ``k8s_psat``), or None when it only
    renewed here an SVID from before this server started (a restart forgets, as SPIRE's
    in-memory view would without its datastore)."""

    node: str
    spiffe_id: SpiffeId
    serial: int
    expires_at: dt.datetime
    method: str | None
    last_issued_at: dt.datetime


def _ignore_issued(issuer_der: bytes, not_after: float) -> None:
    return None


class TokenReviewer(Protocol):
    """Asks the Kubernetes API whether a token is genuine (see ``k8s.py``)."""

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReviewResult: ...


@dataclass(frozen=True)
class ServiceConfig:
    agent_svid_ttl: dt.timedelta = dt.timedelta(hours=1)
    max_request_bytes: int = 1024 * 1024
    max_batch: int = 1000
    agent_rate: float = 200.0  # SVIDs per second per agent, sustained
    agent_burst: float = 2000.0
    attest_rate: float = 2.0  # attestations per second per peer address
    attest_burst: float = 20.0
    psat_allowed_service_accounts: tuple[str, ...] = ("trellis-system:trellis-agent",)
    psat_audience: str = PSAT_AUDIENCE
    # The trust domain's workload key type, told to agents with their entries ("": theirs).
    workload_key_type: str = ""


# Earlier intermediates kept as candidate issuers of agents' leaves (rotations within
# one agent SVID's life are few; the bound keeps a path search short).
MAX_PREVIOUS_INTERMEDIATES = 8


class CaService:
    def __init__(
        self,
        *,
        intermediate: IntermediateAuthority,
        jwt_authority: JwtAuthority,
        bundle: Callable[[], TrustBundle],
        entries: EntrySource,
        join_tokens: JoinTokenRegistry,
        metrics: CaMetrics,
        config: ServiceConfig | None = None,
        token_reviewer: TokenReviewer | None = None,
        signer: Signer | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        banned: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.intermediate = intermediate
        # Intermediates this CA signed with before (a rotation), still unexpired: candidate
        # issuers for an agent that presents its leaf alone, whose SVID an old one signed.
        self.previous_intermediates: tuple[x509.Certificate, ...] = ()
        self.trust_domain = intermediate.trust_domain
        self.jwt_authority = jwt_authority
        self._bundle = bundle
        self.entries = entries
        self.join_tokens = join_tokens
        self.metrics = metrics
        self.config = config or ServiceConfig()
        self.token_reviewer = token_reviewer
        self.signer: Signer = signer or InlineSigner(intermediate)
        self._clock = clock
        self._monotonic = monotonic
        self._banned = banned
        self._agent_limiter = RateLimiter(self.config.agent_rate, self.config.agent_burst)
        self._attest_limiter = RateLimiter(self.config.attest_rate, self.config.attest_burst)
        self._agents: dict[str, float] = {}  # node -> expiry of its newest agent SVID
        self._agent_records: dict[str, AttestedAgent] = {}
        self._auth_cache: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._auth_roots: tuple[x509.Certificate, ...] = ()
        # Told of every X509-SVID signed (issuer DER, notAfter): the CA server's issuance
        # record, which tells ``trellis ca root retire`` when a replaced chain is dead.
        self.on_issued: Callable[[bytes, float], None] = _ignore_issued

    def replace_authorities(
        self, intermediate: IntermediateAuthority, jwt_authority: JwtAuthority
    ) -> None:
        """Sign with a new intermediate and JWT key from now on (rotation)."""
        if intermediate.certificate != self.intermediate.certificate:
            self.previous_intermediates = (
                self.intermediate.certificate,
                *self.previous_intermediates,
            )[:MAX_PREVIOUS_INTERMEDIATES]
        self.intermediate = intermediate
        self.jwt_authority = jwt_authority
        if isinstance(self.signer, InlineSigner):
            self.signer = InlineSigner(intermediate)

    # -- time and small helpers ----------------------------------------------------------

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    def bundle(self) -> TrustBundle:
        return self._bundle()

    def check_size(self, size: int) -> None:
        if size > self.config.max_request_bytes:
            raise Refusal(
                RefusalKind.OVER_LIMIT,
                "request-too-large",
                f"request is {size} bytes; the limit is {self.config.max_request_bytes}",
            )

    def _ttl(self, wanted: dt.timedelta, now: dt.datetime) -> dt.timedelta:
        # An SVID never outlives its intermediate: clamp instead of failing, as long as a
        # useful lifetime is left (SPIRE does the same).
        left = self.intermediate.expires_at - now
        if left < dt.timedelta(minutes=1):
            raise Refusal(
                RefusalKind.AUTHORITY_EXPIRING,
                "intermediate-expiring",
                "the cluster intermediate has (nearly) expired; rotate it",
            )
        return min(wanted, left - dt.timedelta(seconds=1))

    def _sign(
        self,
        csr_der: bytes,
        spiffe_id: SpiffeId,
        ttl: dt.timedelta,
        dns_names: Sequence[str],
        now: dt.datetime,
        kind: str,
    ) -> X509Svid:
        started = time.perf_counter()
        try:
            csr = load_csr(csr_der)
            svid = self.intermediate.issue_x509_svid_from_csr(
                csr, spiffe_id, now=now, ttl=self._ttl(ttl, now), dns_names=dns_names
            )
        except IssuanceError as exc:
            raise self._issuance_refusal(exc.reason, str(exc)) from exc
        self.metrics.x509_issued(time.perf_counter() - started, kind=kind)
        self.on_issued(self.intermediate.certificate_der, svid.expires_at.timestamp())
        return svid

    @staticmethod
    def _issuance_refusal(reason: str, detail: str) -> Refusal:
        kind = RefusalKind.NOT_PERMITTED if reason in _PERMISSION_REASONS else RefusalKind.MALFORMED
        return Refusal(kind, reason, detail)

    def _rate_limit(self, node: str, cost: int) -> None:
        if not self._agent_limiter.allow(node, self._monotonic(), cost):
            wait = self._agent_limiter.retry_after(node, cost)
            raise Refusal(
                RefusalKind.OVER_LIMIT,
                "rate-limited",
                f"rate limit for this agent exceeded; retry in {wait:.2f}s",
            )

    def _agent_issued(self, node: str, svid: X509Svid, method: str | None = None) -> None:
        now = self._clock()
        self._agents[node] = svid.expires_at.timestamp()
        self._agents = {n: t for n, t in self._agents.items() if t > now}
        self.metrics.attested_agents(len(self._agents))
        previous = self._agent_records.get(node)
        self._agent_records[node] = AttestedAgent(
            node=node,
            spiffe_id=svid.spiffe_id,
            serial=svid.leaf.serial_number,
            expires_at=svid.expires_at,
            method=method or (previous.method if previous is not None else None),
            last_issued_at=self._now(),
        )

    def attested_agents(self) -> tuple[AttestedAgent, ...]:
        """Agents whose newest SVID from this server has not expired, by node name."""
        now = self._now()
        self._agent_records = {n: a for n, a in self._agent_records.items() if a.expires_at > now}
        return tuple(self._agent_records[n] for n in sorted(self._agent_records))

    def refresh_agent_gauge(self) -> None:
        now = self._clock()
        self._agents = {n: t for n, t in self._agents.items() if t > now}
        self.metrics.attested_agents(len(self._agents))

    # -- authentication ------------------------------------------------------------------

    def is_banned(self, node: str) -> bool:
        return node in self._banned()

    def check_not_banned(self, node: str) -> None:
        # Checked on every call, after the (cached) SVID check: a ban takes effect on the
        # next call of an agent already connected, and lifting it needs no new SVID.
        if self.is_banned(node):
            raise Refusal(
                RefusalKind.NOT_PERMITTED,
                "agent-banned",
                f"node {node} is banned at this CA",
            )

    def authenticate(self, chain_pem: bytes | None) -> str:
        """The node of the agent whose SVID chain (PEM, leaf first) the TLS layer received.

        grpc has already checked the chain against the bundle's roots; this repeats the
        check with Trellis's own SPIFFE rules (``verify_x509_svid``) and requires an agent
        ID. Results are cached per chain until the leaf expires.
        """
        if not chain_pem:
            raise Refusal(
                RefusalKind.NOT_AUTHENTICATED,
                "no-client-certificate",
                "call this on the mutual-TLS listener with an agent SVID",
            )
        now = self._clock()
        roots = self.bundle().x509_authorities
        if roots is not self._auth_roots:
            self._auth_cache.clear()
            self._auth_roots = roots
        cached = self._auth_cache.get(chain_pem)
        if cached is not None and now < cached[1]:
            self.check_not_banned(cached[0])
            return cached[0]
        try:
            # The serving intermediate as a candidate issuer: an agent with an ML-DSA chain
            # presents its leaf alone (ca.api.client.presented_chain_pem).
            # After a rotation its SVID may come from an earlier intermediate of this CA.
            now_dt = dt.datetime.fromtimestamp(now, dt.UTC)
            chain = [
                *x509.load_pem_x509_certificates(chain_pem),
                self.intermediate.certificate,
                *(c for c in self.previous_intermediates if c.not_valid_after_utc > now_dt),
            ]
            verified = verify_x509_svid(
                chain, {self.trust_domain: roots}, now=dt.datetime.fromtimestamp(now, dt.UTC)
            )
        except (ValueError, VerificationError) as exc:
            reason = exc.reason if isinstance(exc, VerificationError) else "malformed"
            raise Refusal(
                RefusalKind.NOT_AUTHENTICATED,
                f"agent-svid-{reason}",
                f"agent SVID does not verify: {exc}",
            ) from exc
        node = node_of_agent(verified.spiffe_id, self.trust_domain)
        if node is None:
            raise Refusal(
                RefusalKind.NOT_AUTHENTICATED,
                "not-an-agent",
                f"{verified.spiffe_id} is not an agent of {self.trust_domain}",
            )
        self._auth_cache[chain_pem] = (node, chain[0].not_valid_after_utc.timestamp())
        if len(self._auth_cache) > 10_000:
            self._auth_cache.popitem(last=False)
        self.check_not_banned(node)
        return node

    # -- RPCs ----------------------------------------------------------------------------

    async def attest_agent(self, request: AttestationRequest, peer: str) -> AgentSvid:
        if not self._attest_limiter.allow(peer, self._monotonic()):
            raise Refusal(
                RefusalKind.OVER_LIMIT,
                "rate-limited",
                "too many attestation attempts from this address",
            )
        proof = request.proof
        try:
            if isinstance(proof, JoinTokenProof):
                node = self.join_tokens.redeem(proof.token, now=self._clock())
                method = "join_token"
            elif isinstance(proof, PsatProof):
                node = await self._attest_psat(proof.token)
                method = "k8s_psat"
            else:
                raise Refusal(
                    RefusalKind.MALFORMED,
                    "no-attestation",
                    "AttestAgentRequest carries no attestation data",
                )
        except AttestationError as exc:
            raise Refusal(RefusalKind.NOT_AUTHENTICATED, exc.reason, str(exc)) from exc
        # After the proof, not before: only a genuine token or PSAT learns of the ban. A
        # join token spent here stays spent; an unbanned node needs a new one.
        self.check_not_banned(node)
        agent_id = agent_spiffe_id(self.trust_domain, node)
        now = self._now()
        svid = self._sign(request.csr, agent_id, self.config.agent_svid_ttl, (), now, "agent")
        self._agent_issued(node, svid, method)
        log_event(logging.INFO, "agent-attested", node=node, method=method, peer=peer)
        return AgentSvid(node, svid, self.bundle(), self.config.max_batch)

    async def _attest_psat(self, token: str) -> str:
        if self.token_reviewer is None:
            raise Refusal(
                RefusalKind.UNAVAILABLE,
                "psat-not-configured",
                "this CA does not attest Kubernetes nodes (start it with --k8s-psat)",
            )
        if not token or len(token) > 16 * 1024:
            raise AttestationError("psat-malformed", "token is empty or oversized")
        try:
            review = await self.token_reviewer.review(token, [self.config.psat_audience])
        except OSError as exc:
            raise Refusal(
                RefusalKind.UNAVAILABLE,
                "token-review-unavailable",
                f"TokenReview failed: {exc}",
            ) from exc
        return psat_node_name(
            token,
            review,
            allowed_service_accounts=self.config.psat_allowed_service_accounts,
            audience=self.config.psat_audience,
        )

    def renew_agent(self, csr: bytes, node: str) -> AgentSvid:
        self._rate_limit(node, 1)
        now = self._now()
        agent_id = agent_spiffe_id(self.trust_domain, node)
        svid = self._sign(csr, agent_id, self.config.agent_svid_ttl, (), now, "agent")
        self._agent_issued(node, svid)
        log_event(logging.INFO, "agent-renewed", node=node)
        return AgentSvid(node, svid, self.bundle(), self.config.max_batch)

    def _entry_for(self, entry_id: str, node: str) -> RegistrationEntry:
        entry = self.entries.current().get(entry_id)
        if entry is None or not entry.runs_on(node):
            # The same answer for "no such entry" and "not yours": an agent learns nothing
            # about other nodes' entries by probing.
            raise Refusal(
                RefusalKind.NOT_PERMITTED,
                "entry-not-authorized",
                f"entry {entry_id!r} does not exist or is not for node {node}",
            )
        return entry

    async def batch_new_x509_svid(
        self, items: Sequence[SvidRequest], node: str
    ) -> list[SignedSvid]:
        if not items:
            raise Refusal(RefusalKind.MALFORMED, "empty-batch", "no CSRs in the batch")
        if len(items) > self.config.max_batch:
            raise Refusal(
                RefusalKind.OVER_LIMIT,
                "batch-too-large",
                f"{len(items)} CSRs in one batch; the limit is {self.config.max_batch}",
            )
        # Authorise everything before signing anything: all or nothing.
        entries = [self._entry_for(item.entry_id, node) for item in items]
        self._rate_limit(node, len(items))
        now = self._now()
        sign_requests = [
            SignRequest(
                item.csr,
                str(e.spiffe_id),
                self._ttl(e.x509_svid_ttl, now).total_seconds(),
                e.dns_names,
            )
            for item, e in zip(items, entries, strict=True)
        ]
        try:
            results = await self.signer.sign(sign_requests, now.timestamp())
        except SignerUnavailable as exc:
            raise Refusal(RefusalKind.UNAVAILABLE, "signer-unavailable", str(exc)) from exc
        # Refuse before counting anything: SVIDs signed ahead of a refused CSR are dropped
        # with the batch and were never issued.
        signed: list[Signed] = []
        for result in results:
            if isinstance(result, SignFailure):
                raise self._issuance_refusal(result.reason, result.detail)
            signed.append(result)
        svids = []
        for result, e in zip(signed, entries, strict=False):
            self.metrics.x509_issued(result.seconds)
            self.on_issued(result.chain_der[-1], result.expires_at)
            svids.append(SignedSvid(e.spiffe_id, result.chain_der, int(result.expires_at)))
        if len(svids) != len(items):
            raise Refusal(RefusalKind.INCOMPLETE, "signer-incomplete", "signing was incomplete")
        return svids

    def new_jwt_svid(self, entry_id: str, audience: Sequence[str], node: str) -> JwtSvidToken:
        entry = self._entry_for(entry_id, node)
        self._rate_limit(node, 1)
        started = time.perf_counter()
        try:
            svid = self.jwt_authority.sign(
                entry.spiffe_id, list(audience), now=self._now(), ttl=entry.jwt_svid_ttl
            )
        except JwtSvidError as exc:
            raise Refusal(RefusalKind.MALFORMED, exc.reason, str(exc)) from exc
        self.metrics.jwt_issued(time.perf_counter() - started)
        return JwtSvidToken(svid.spiffe_id, svid.token, svid.expiry)

    def fetch_entries(self, node: str) -> NodeEntries:
        self._rate_limit(node, 1)
        current = self.entries.current()
        return NodeEntries(
            current.for_node(node),
            current.revision,
            self.config.max_batch,
            self.config.workload_key_type,
        )
