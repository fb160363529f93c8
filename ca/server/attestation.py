"""Node attestation, sans I/O: join tokens and Kubernetes projected service-account tokens.

A node proves who it is once; the CA then signs its agent SVID
``spiffe://<trust-domain>/trellis/agent/<node>`` and everything afterwards is authenticated
by that certificate.

Join tokens (local mode) are random 256-bit secrets, single use and expiring. Only their
SHA-256 is ever stored (in memory, and in ``join-tokens/<sha256>.json`` files when created
with ``trellis ca token create``): whoever reads the CA's memory or directory learns which
nodes may join, not how. A redeemed token's hash is remembered until the token would have
expired, so a replay is told apart from a forgery in logs and metrics.

PSAT: the TokenReview API (run by the shell in ``k8s.py``) tells whether the API server
issued the token for audience ``trellis-ca``; this module turns its answer into a node name
and refuses service accounts that are not allowed to attest nodes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ca.spiffeid import SpiffeId, TrustDomain

__all__ = [
    "AGENT_PATH_PREFIX",
    "PSAT_AUDIENCE",
    "AttestationError",
    "JoinTokenRecord",
    "JoinTokenRegistry",
    "TokenReviewResult",
    "agent_spiffe_id",
    "hash_join_token",
    "new_join_token",
    "node_of_agent",
    "psat_node_name",
]

AGENT_PATH_PREFIX = "/trellis/agent/"
PSAT_AUDIENCE = "trellis-ca"
JOIN_TOKEN_PREFIX = "tjt_"  # noqa: S105 (a prefix, not a secret)
_NODE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?$")
MAX_TOKEN_CHARS = 16 * 1024


class AttestationError(Exception):
    """Attestation refused; ``reason`` is the metric label, the message is safe to log."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


def is_node_name(node: str) -> bool:
    """Whether ``node`` may name a node (and so an agent ID's last segment)."""
    return bool(_NODE.match(node))


def agent_spiffe_id(trust_domain: TrustDomain, node: str) -> SpiffeId:
    if not _NODE.match(node):
        raise AttestationError("bad-node-name", f"{node!r} is not a usable node name")
    return trust_domain.spiffe_id(AGENT_PATH_PREFIX + node)


def node_of_agent(spiffe_id: SpiffeId, trust_domain: TrustDomain) -> str | None:
    """The node an agent SVID names, or None if ``spiffe_id`` is not an agent of ours."""
    if spiffe_id.trust_domain != trust_domain or not spiffe_id.path.startswith(AGENT_PATH_PREFIX):
        return None
    node = spiffe_id.path[len(AGENT_PATH_PREFIX) :]
    return node if _NODE.match(node) else None


# -- join tokens ----------------------------------------------------------------------------


def new_join_token() -> str:
    return JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_join_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class JoinTokenRecord:
    node: str
    expires_at: float  # Unix seconds


TokenLookup = Callable[[str], JoinTokenRecord | None]


@dataclass
class JoinTokenRegistry:
    """Single-use join tokens by SHA-256. ``lookup`` finds tokens created elsewhere (the
    token files of ``trellis ca token create``); ``on_redeemed`` lets the shell delete them.
    """

    lookup: TokenLookup | None = None
    on_redeemed: Callable[[str], None] | None = None
    _pending: dict[str, JoinTokenRecord] = field(default_factory=dict)
    _redeemed: dict[str, float] = field(default_factory=dict)

    def add(self, token_hash: str, record: JoinTokenRecord) -> None:
        self._pending[token_hash] = record

    def issue(self, node: str, *, now: float, ttl: float) -> str:
        """A new token for ``node``; only its hash is kept."""
        agent_spiffe_id(TrustDomain("example.org"), node)  # validates the node name
        token = new_join_token()
        self.add(hash_join_token(token), JoinTokenRecord(node, now + ttl))
        return token

    def redeem(self, token: str, *, now: float) -> str:
        """The node this token was issued for; the token is spent. Raises AttestationError."""
        self._forget_expired(now)
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise AttestationError("join-token-invalid", "join token is empty or oversized")
        digest = hash_join_token(token)
        if digest in self._redeemed:
            raise AttestationError("join-token-reused", "join token has already been used")
        record = self._pending.pop(digest, None)
        if record is None and self.lookup is not None:
            record = self.lookup(digest)
        if record is None:
            # One message for every unknown token: a caller learns nothing from the refusal.
            raise AttestationError("join-token-invalid", "join token is not valid")
        self._redeemed[digest] = max(record.expires_at, now)
        if self.on_redeemed is not None:
            self.on_redeemed(digest)
        if now >= record.expires_at:
            raise AttestationError("join-token-expired", "join token has expired")
        return record.node

    def _forget_expired(self, now: float) -> None:
        if len(self._redeemed) > 1024:
            self._redeemed = {h: t for h, t in self._redeemed.items() if t > now}
        if len(self._pending) > 1024:
            self._pending = {h: r for h, r in self._pending.items() if r.expires_at > now}

    def __len__(self) -> int:
        return len(self._pending)


# -- Kubernetes PSAT ------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenReviewResult:
    """The parts of a TokenReview ``status`` that attestation uses."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    error: str = ""

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> TokenReviewResult:
        """Parse ``TokenReview.status`` (authentication.k8s.io/v1) as JSON-decoded."""
        status = status or {}
        user = status.get("user") or {}
        raw_extra = user.get("extra") or {}
        extra = {
            str(k): tuple(str(v) for v in (vals or ()))
            for k, vals in raw_extra.items()
            if isinstance(vals, list | tuple)
        }
        return cls(
            authenticated=bool(status.get("authenticated")),
            username=str(user.get("username") or ""),
            audiences=tuple(str(a) for a in status.get("audiences") or ()),
            extra=extra,
            error=str(status.get("error") or ""),
        )


def _unverified_claims(token: str) -> dict[str, Any]:
    # Only called after the API server has authenticated the token: the claims are then
    # the API server's, merely read here (its signature was checked by TokenReview).
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def psat_node_name(
    token: str,
    review: TokenReviewResult,
    *,
    allowed_service_accounts: Sequence[str],
    audience: str = PSAT_AUDIENCE,
) -> str:
    """The node a reviewed projected service-account token was issued on.

    ``allowed_service_accounts`` holds ``namespace:name`` pairs (the agent DaemonSet's
    account); any other authenticated account is refused. The node name comes from the
    ``authentication.kubernetes.io/node-name`` extra (Kubernetes >= 1.32) or else from the
    token's ``kubernetes.io.node.name`` claim.
    """
    if not review.authenticated:
        why = f": {review.error}" if review.error else ""
        raise AttestationError(
            "psat-not-authenticated", f"TokenReview did not authenticate the token{why}"
        )
    if review.audiences and audience not in review.audiences:
        raise AttestationError("psat-wrong-audience", f"token is not for audience {audience!r}")
    prefix = "system:serviceaccount:"
    if not review.username.startswith(prefix):
        raise AttestationError("psat-not-service-account", "token is not a service-account token")
    account = review.username[len(prefix) :]
    if account not in allowed_service_accounts:
        raise AttestationError(
            "psat-service-account-not-allowed",
            f"service account {account} may not attest nodes",
        )
    names = review.extra.get("authentication.kubernetes.io/node-name", ())
    node = names[0] if names else ""
    if not node:
        k8s = _unverified_claims(token).get("kubernetes.io")
        node_claim = k8s.get("node") if isinstance(k8s, dict) else None
        node = str(node_claim.get("name") or "") if isinstance(node_claim, dict) else ""
    if not node:
        raise AttestationError(
            "psat-no-node", "token carries no node name (use a projected, pod-bound token)"
        )
    if not _NODE.match(node):
        raise AttestationError("bad-node-name", f"{node!r} is not a usable node name")
    return node
