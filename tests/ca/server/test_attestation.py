"""Attestation and rate limiting as pure logic: values and `now` in, decisions out."""

from __future__ import annotations

import base64
import json

import pytest

from ca import SpiffeId, TrustDomain
from ca.server.attestation import (
    AttestationError,
    JoinTokenRecord,
    JoinTokenRegistry,
    TokenReviewResult,
    agent_spiffe_id,
    hash_join_token,
    node_of_agent,
    psat_node_name,
)
from ca.server.ratelimit import RateLimiter

TD = TrustDomain("example.org")
ALLOWED = ("trellis-system:trellis-agent",)


def test_join_token_is_redeemed_once_for_its_node() -> None:
    registry = JoinTokenRegistry()
    token = registry.issue("node-a", now=100.0, ttl=60)
    assert registry.redeem(token, now=110.0) == "node-a"
    with pytest.raises(AttestationError) as replay:
        registry.redeem(token, now=111.0)
    assert replay.value.reason == "join-token-reused"


def test_join_token_after_its_expiry_is_refused_and_spent() -> None:
    registry = JoinTokenRegistry()
    token = registry.issue("node-a", now=100.0, ttl=60)
    with pytest.raises(AttestationError) as expired:
        registry.redeem(token, now=160.0)
    assert expired.value.reason == "join-token-expired"
    with pytest.raises(AttestationError) as again:
        registry.redeem(token, now=161.0)
    assert again.value.reason == "join-token-reused"


def test_unknown_and_empty_tokens_get_one_indistinct_refusal() -> None:
    registry = JoinTokenRegistry()
    registry.issue("node-a", now=0.0, ttl=60)
    for token in ("tjt_forged", "", "x" * 20_000):
        with pytest.raises(AttestationError) as refused:
            registry.redeem(token, now=1.0)
        assert refused.value.reason == "join-token-invalid"


def test_registry_keeps_only_hashes_and_consults_the_external_lookup() -> None:
    looked_up: list[str] = []
    removed: list[str] = []
    token = "tjt_from-the-cli"

    def lookup(digest: str) -> JoinTokenRecord | None:
        looked_up.append(digest)
        return JoinTokenRecord("node-z", 50.0) if digest == hash_join_token(token) else None

    registry = JoinTokenRegistry(lookup=lookup, on_redeemed=removed.append)
    own = registry.issue("node-a", now=0.0, ttl=60)
    assert own not in repr(registry.__dict__)
    assert registry.redeem(token, now=1.0) == "node-z"
    assert removed == [hash_join_token(token)] == looked_up


def test_agent_ids_name_the_node_and_nothing_else_is_an_agent() -> None:
    agent = agent_spiffe_id(TD, "node-a")
    assert str(agent) == "spiffe://example.org/trellis/agent/node-a"
    assert node_of_agent(agent, TD) == "node-a"
    assert node_of_agent(SpiffeId("spiffe://example.org/ns/x/sa/y"), TD) is None
    assert node_of_agent(SpiffeId("spiffe://other.org/trellis/agent/node-a"), TD) is None
    assert node_of_agent(SpiffeId("spiffe://example.org/trellis/agent/a/b"), TD) is None
    with pytest.raises(AttestationError):
        agent_spiffe_id(TD, "bad/node")


def _jwt(claims: dict[str, object]) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{body}.c2ln"


def _review(**user: object) -> TokenReviewResult:
    return TokenReviewResult.from_status(
        {
            "authenticated": True,
            "audiences": ["trellis-ca"],
            "user": {"username": "system:serviceaccount:trellis-system:trellis-agent", **user},
        }
    )


def test_psat_node_comes_from_the_token_review_extra_when_present() -> None:
    review = _review(extra={"authentication.kubernetes.io/node-name": ["worker-1"]})
    assert psat_node_name(_jwt({}), review, allowed_service_accounts=ALLOWED) == "worker-1"


def test_psat_node_falls_back_to_the_tokens_kubernetes_claims() -> None:
    token = _jwt({"kubernetes.io": {"namespace": "trellis-system", "node": {"name": "worker-2"}}})
    assert psat_node_name(token, _review(), allowed_service_accounts=ALLOWED) == "worker-2"


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ({"authenticated": False, "error": "token expired"}, "psat-not-authenticated"),
        (
            {
                "authenticated": True,
                "audiences": ["api"],
                "user": {"username": "system:serviceaccount:trellis-system:trellis-agent"},
            },
            "psat-wrong-audience",
        ),
        ({"authenticated": True, "user": {"username": "alice"}}, "psat-not-service-account"),
        (
            {"authenticated": True, "user": {"username": "system:serviceaccount:default:web"}},
            "psat-service-account-not-allowed",
        ),
        (
            {
                "authenticated": True,
                "user": {"username": "system:serviceaccount:trellis-system:trellis-agent"},
            },
            "psat-no-node",
        ),
    ],
)
def test_psat_refusals_name_their_reason(status: dict[str, object], reason: str) -> None:
    with pytest.raises(AttestationError) as refused:
        psat_node_name(
            _jwt({}), TokenReviewResult.from_status(status), allowed_service_accounts=ALLOWED
        )
    assert refused.value.reason == reason


def test_token_bucket_allows_the_burst_then_the_sustained_rate() -> None:
    limiter = RateLimiter(rate=10, burst=5)
    assert all(limiter.allow("a", 0.0) for _ in range(5))
    assert not limiter.allow("a", 0.0)
    assert limiter.retry_after("a") == pytest.approx(0.1)
    assert limiter.allow("b", 0.0)  # another caller has its own bucket
    assert limiter.allow("a", 0.1)
    assert not limiter.allow("a", 0.1)
    assert not limiter.allow("a", 10.0, cost=6)  # never more than the burst
    assert limiter.allow("a", 10.0, cost=5)


def test_token_bucket_forgets_the_least_recent_caller_beyond_its_capacity() -> None:
    limiter = RateLimiter(rate=1, burst=1, max_keys=2)
    limiter.allow("a", 0.0)
    limiter.allow("b", 0.0)
    limiter.allow("c", 0.0)
    assert limiter.allow("a", 0.0)  # a was evicted and starts with a full bucket
