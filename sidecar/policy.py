"""Inbound authorisation as data: who may open a CONNECT stream to which local port.

Pure: an `Authorizer` is built once from the YAML config or from the operator's
`policy.json` (a `meshapi.policy.PolicyDocument`) plus the pod's labels, and
`decide(caller, port, own_trust_domain)` is a function of its arguments.

Semantics (the operator's AccessPolicy):

* A rule is an exact SPIFFE ID or a prefix; a prefix matches whole path segments
  (`/ns/web` allows `/ns/web` and `/ns/web/x`, never `/ns/webhook`), and a prefix with an
  empty path (`spiffe://example.org`) allows the whole trust domain.
* The rules that apply to a port are the union of every selecting policy that lists the
  port or lists no port at all; an applicable policy with an empty allow list refuses
  everyone (deny-all).
* A port no policy covers admits any caller of the sidecar's own trust domain (the mesh
  default: mTLS everywhere, no cross-trust-domain calls without a rule).

The document's grammar and the rule type belong to `meshapi.policy`, which the operator
renders with; this module only reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ca.spiffeid import SpiffeId, TrustDomain
from core.errors import FieldError
from meshapi.policy import CallerRule, PolicyDocument, parse_caller_rules, parse_policy_document

__all__ = [
    "Authorizer",
    "CallerRule",
    "Decision",
    "PolicyError",
    "authorizer_for_pod",
    "authorizer_from_document",
    "parse_pod_labels",
    "parse_rules",
]

# A policy input is malformed; `field` names where (the document's JSON path, or the line
# of the labels file). One type with the document parser's errors, so one except covers both.
PolicyError = FieldError

# `[{exact: ID} | {prefix: ID}, ...]`: the YAML config's allow lists share the document's.
parse_rules = parse_caller_rules


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    # What decided, for the access log and a refused caller's 403: the policies covering the
    # port ("AccessPolicy ledger"), "default" (none covers it) or "identity" (no SPIFFE ID).
    rule: str = "default"


@dataclass(frozen=True, slots=True)
class Authorizer:
    """`per_port` rules for listed ports, `any_port` for policies that list none.

    `None` for a port means "no policy covers it" (the own-trust-domain default);
    an empty tuple means deny-all.
    """

    per_port: Mapping[int, tuple[CallerRule, ...]] = field(default_factory=dict)
    any_port: tuple[CallerRule, ...] | None = None
    # Where the rules came from (a policy's name), per listed port and for any port; and
    # the ports whose app speaks HTTP (a refusal there can be an HTTP 403 for the caller).
    sources: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    any_port_sources: tuple[str, ...] = ()
    http_ports: frozenset[int] = frozenset()
    any_port_http: bool = False

    def rules_for(self, port: int) -> tuple[CallerRule, ...] | None:
        listed = self.per_port.get(port)
        if listed is None:
            return self.any_port
        if self.any_port is None:
            return listed
        return listed + self.any_port

    def source_of(self, port: int) -> str:
        """The policies whose rules apply to ``port``, as a refused caller sees them named."""
        names = self.sources.get(port, ()) if port in self.per_port else ()
        if self.any_port is not None:
            names += self.any_port_sources
        return ", ".join(dict.fromkeys(names)) or f"allow list for port {port}"

    def speaks_http(self, port: int) -> bool:
        return port in self.http_ports or self.any_port_http

    def decide(
        self, caller: SpiffeId | None, port: int, own_trust_domain: TrustDomain | None
    ) -> Decision:
        if caller is None:
            return Decision(False, "peer presented no SPIFFE ID", "identity")
        rules = self.rules_for(port)
        if rules is None:
            if own_trust_domain is not None and caller.trust_domain == own_trust_domain:
                return Decision(True, "default: same trust domain")
            return Decision(False, f"no rule for port {port} and {caller} is outside our domain")
        for rule in rules:
            if rule.allows(caller):
                return Decision(True, str(rule), self.source_of(port))
        return Decision(False, f"{caller} matches no rule for port {port}", self.source_of(port))

    def describe(self) -> dict[str, Any]:
        # The sources are names (an AccessPolicy's, or the config key holding the rules),
        # never a rule's content beyond the SPIFFE IDs listed above: `trellis policy
        # explain --sidecar` names from these what a refused caller's 403 names.
        return {
            "ports": {
                str(p): [str(r) for r in rules] for p, rules in sorted(self.per_port.items())
            },
            "any_port": None if self.any_port is None else [str(r) for r in self.any_port],
            "sources": {str(p): list(self.sources.get(p, ())) for p in sorted(self.per_port)},
            "any_port_sources": list(self.any_port_sources),
        }


def authorizer_for_pod(document: PolicyDocument, labels: Mapping[str, str]) -> Authorizer:
    """The document's policies that select a pod with these labels, as one `Authorizer`."""
    per_port: dict[int, tuple[CallerRule, ...]] = {}
    any_port: tuple[CallerRule, ...] | None = None
    sources: dict[int, tuple[str, ...]] = {}
    any_port_sources: tuple[str, ...] = ()
    http_ports: set[int] = set()
    any_port_http = False
    for policy in document.selecting(labels):
        source = f"AccessPolicy {policy.name or '(unnamed)'}"
        http = policy.protocol == "http"
        if not policy.ports:
            any_port = (any_port or ()) + policy.allow
            any_port_sources = (*any_port_sources, source)
            any_port_http = any_port_http or http
        for port in policy.ports:
            per_port[port] = per_port.get(port, ()) + policy.allow
            sources[port] = (*sources.get(port, ()), source)
            if http:
                http_ports.add(port)
    return Authorizer(
        per_port, any_port, sources, any_port_sources, frozenset(http_ports), any_port_http
    )


def authorizer_from_document(document: Any, labels: Mapping[str, str]) -> Authorizer:
    """The operator's `SidecarPolicy` document as JSON decoded it (`PolicyError` names the
    JSON path of a bad value), restricted to the policies selecting this pod."""
    return authorizer_for_pod(parse_policy_document(document, "policy"), labels)


def parse_pod_labels(text: str) -> dict[str, str]:
    """The downward API's labels file: one `key="value"` per line (Go-quoted value)."""
    labels: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise PolicyError(f"pod-labels line {number}", f'expected key="value", got {line!r}')
        if value.startswith('"'):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise PolicyError(f"pod-labels line {number}", f"bad quoted value: {exc}") from exc
            if not isinstance(parsed, str):
                raise PolicyError(f"pod-labels line {number}", "value is not a string")
            value = parsed
        labels[key] = value
    return labels


def merge(authorizers: Iterable[Authorizer]) -> Authorizer:
    per_port: dict[int, tuple[CallerRule, ...]] = {}
    any_port: tuple[CallerRule, ...] | None = None
    sources: dict[int, tuple[str, ...]] = {}
    any_port_sources: tuple[str, ...] = ()
    http_ports: frozenset[int] = frozenset()
    any_port_http = False
    for auth in authorizers:
        for port, rules in auth.per_port.items():
            per_port[port] = per_port.get(port, ()) + rules
            sources[port] = sources.get(port, ()) + auth.sources.get(port, ())
        if auth.any_port is not None:
            any_port = (any_port or ()) + auth.any_port
            any_port_sources += auth.any_port_sources
        http_ports |= auth.http_ports
        any_port_http = any_port_http or auth.any_port_http
    return Authorizer(per_port, any_port, sources, any_port_sources, http_ports, any_port_http)
