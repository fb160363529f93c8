"""Inbound authorisation as data: who may open a CONNECT stream to which local port.

Pure: an `Authorizer` is built once from the YAML config or from the operator's
`policy.json` plus the pod's labels, and `decide(caller, port, own_trust_domain)` is a
function of its arguments.

Semantics (the operator's AccessPolicy, DESIGN.md §4):

* A rule is an exact SPIFFE ID or a prefix; a prefix matches whole path segments
  (`/ns/web` allows `/ns/web` and `/ns/web/x`, never `/ns/webhook`), and a prefix with an
  empty path (`spiffe://example.org`) allows the whole trust domain.
* The rules that apply to a port are the union of every selecting policy that lists the
  port or lists no port at all; an applicable policy with an empty allow list refuses
  everyone (deny-all).
* A port no policy covers admits any caller of the sidecar's own trust domain (the mesh
  default: mTLS everywhere, no cross-trust-domain calls without a rule).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from core.errors import FieldError
from core.labels import LabelSelector

__all__ = [
    "Authorizer",
    "CallerRule",
    "Decision",
    "PolicyError",
    "authorizer_from_document",
    "parse_pod_labels",
    "parse_rules",
]


class PolicyError(ValueError):
    """A policy input is malformed; `field` names where."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.field = where


@dataclass(frozen=True, slots=True)
class CallerRule:
    spiffe_id: SpiffeId
    prefix: bool

    def allows(self, caller: SpiffeId) -> bool:
        return caller.is_under(self.spiffe_id) if self.prefix else caller == self.spiffe_id

    def __str__(self) -> str:
        return f"{'prefix' if self.prefix else 'exact'}:{self.spiffe_id}"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Authorizer:
    """`per_port` rules for listed ports, `any_port` for policies that list none.

    `None` for a port means "no policy covers it" (the own-trust-domain default);
    an empty tuple means deny-all.
    """

    per_port: Mapping[int, tuple[CallerRule, ...]] = field(default_factory=dict)
    any_port: tuple[CallerRule, ...] | None = None

    def rules_for(self, port: int) -> tuple[CallerRule, ...] | None:
        listed = self.per_port.get(port)
        if listed is None:
            return self.any_port
        if self.any_port is None:
            return listed
        return listed + self.any_port

    def decide(
        self, caller: SpiffeId | None, port: int, own_trust_domain: TrustDomain | None
    ) -> Decision:
        if caller is None:
            return Decision(False, "peer presented no SPIFFE ID")
        rules = self.rules_for(port)
        if rules is None:
            if own_trust_domain is not None and caller.trust_domain == own_trust_domain:
                return Decision(True, "default: same trust domain")
            return Decision(False, f"no rule for port {port} and {caller} is outside our domain")
        for rule in rules:
            if rule.allows(caller):
                return Decision(True, str(rule))
        return Decision(False, f"{caller} matches no rule for port {port}")

    def describe(self) -> dict[str, Any]:
        return {
            "ports": {
                str(p): [str(r) for r in rules] for p, rules in sorted(self.per_port.items())
            },
            "any_port": None if self.any_port is None else [str(r) for r in self.any_port],
        }


def parse_rules(raw: Any, where: str) -> tuple[CallerRule, ...]:
    """`[{exact: ID} | {prefix: ID}, ...]` (the AccessPolicy `allow` shape)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise PolicyError(where, "expected a list of {exact: SPIFFE_ID} or {prefix: SPIFFE_ID}")
    rules: list[CallerRule] = []
    for index, item in enumerate(raw):
        at = f"{where}[{index}]"
        if not isinstance(item, Mapping) or len(item) != 1:
            raise PolicyError(at, "give exactly one of exact: SPIFFE_ID or prefix: SPIFFE_ID")
        key, value = next(iter(item.items()))
        if key not in ("exact", "prefix"):
            raise PolicyError(at, f"unknown key {key!r}; use exact or prefix")
        if not isinstance(value, str):
            raise PolicyError(f"{at}.{key}", "expected a SPIFFE ID string")
        try:
            rules.append(CallerRule(SpiffeId(value), key == "prefix"))
        except SpiffeIdError as exc:
            raise PolicyError(f"{at}.{key}", str(exc)) from exc
    return tuple(rules)


def _ports(raw: Any, where: str) -> tuple[int, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise PolicyError(where, "expected a list of port numbers")
    ports = []
    for index, port in enumerate(raw):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise PolicyError(f"{where}[{index}]", f"{port!r} is not a port number (1-65535)")
        ports.append(port)
    return tuple(ports)


def authorizer_from_document(document: Any, labels: Mapping[str, str]) -> Authorizer:
    """The operator's `SidecarPolicy` document (mesh_operator.reconcile.compile_policies),
    restricted to the policies whose selector matches this pod's labels."""
    if not isinstance(document, Mapping):
        raise PolicyError("policy", "expected a JSON object (kind SidecarPolicy)")
    policies = document.get("policies") or []
    if not isinstance(policies, list):
        raise PolicyError("policy.policies", "expected a list")
    per_port: dict[int, tuple[CallerRule, ...]] = {}
    any_port: tuple[CallerRule, ...] | None = None
    for index, policy in enumerate(policies):
        at = f"policy.policies[{index}]"
        if not isinstance(policy, Mapping):
            raise PolicyError(at, "expected an object")
        try:
            selector = LabelSelector.parse(policy.get("selector"), f"{at}.selector")
        except FieldError as exc:
            raise PolicyError(f"{at}.selector", str(exc)) from exc
        if not selector.matches(labels):
            continue
        rules = parse_rules(policy.get("allow"), f"{at}.allow")
        ports = _ports(policy.get("ports"), f"{at}.ports")
        if not ports:
            any_port = (any_port or ()) + rules
        for port in ports:
            per_port[port] = per_port.get(port, ()) + rules
    return Authorizer(per_port, any_port)


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
    for auth in authorizers:
        for port, rules in auth.per_port.items():
            per_port[port] = per_port.get(port, ()) + rules
        if auth.any_port is not None:
            any_port = (any_port or ()) + auth.any_port
    return Authorizer(per_port, any_port)
