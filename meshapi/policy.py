"""The ``SidecarPolicy`` document: who may call the pods of one namespace, and on which ports.

The operator compiles a namespace's ``AccessPolicy`` objects into one such document
(``mesh_operator.reconcile.compile_policies``) and writes it, as ``policy.json``, into the
namespace's ``trellis-policy`` ConfigMap; every sidecar there mounts it and keeps the
policies whose selector matches its own pod's labels (``sidecar.policy``). The canonical
form, which ``render_policy_document`` writes and ``parse_policy_document`` reads back
unchanged::

    {"apiVersion": "trellis.dev/v1alpha1", "kind": "SidecarPolicy",
     "namespace": "shop", "trustDomain": "example.org",
     "policies": [{"name": "ledger",
                   "selector": {"matchExpressions": [{"key": "app", "operator": "In",
                                                      "values": ["web"]}]},
                   "ports": [8080], "mtls": "PERMISSIVE",
                   "allow": [{"exact": "spiffe://example.org/ns/front/sa/web"},
                             {"prefix": "spiffe://example.org/ns/tools"}]}]}

What the reader accepts beyond that form, as the sidecar always has: ``apiVersion``,
``kind``, ``namespace``, ``trustDomain`` and a policy's ``name`` may be left out (a left-out
one is left out again on rendering); ``selector`` may use ``matchLabels`` (rendered back as
``matchExpressions``); ``ports`` and ``allow`` default to none, and ``mtls`` to unset (left
out again on rendering). Keys it does not know are ignored, so an operator one
release ahead can add a field without every older sidecar refusing the whole document.

Meaning (enforced by ``sidecar.policy.Authorizer``): the rules that apply to a port are the
union of every selecting policy that lists the port or lists no port at all; an applicable
policy with an empty ``allow`` refuses everyone. ``mtls`` (``STRICT`` or ``PERMISSIVE``)
says whether a caller without TLS may reach the ports the policy applies to: a port is
permissive when an applicable policy says ``PERMISSIVE`` and none says ``STRICT``; a port no
policy sets a mode for is strict (``sidecar.permissive``). An mTLS caller is authorised by
``allow`` in both modes.

``mesh`` (``meshapi.registry``) lists the destinations that are in the mesh and what a
transparent sidecar does with the others; left out, it is left out again on rendering.

``protocol`` (``tcp`` or ``http``, unset meaning tcp) says what the app behind the policy's
ports speaks. It decides how a refusal reaches the caller (for ``http`` the caller's
sidecar answers its app ``403 Forbidden`` naming the policy, for ``tcp`` it resets the
connection: an HTTP answer would be garbage to another protocol) and whether a request
that arrived as 0-RTT data is served (``http``: safe methods, with ``Early-Data: 1``) or
answered ``425 Too Early``. ``earlyDataMethods``, in
older documents, was never read by a data plane; it was withdrawn and, as an unknown key,
is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from core.errors import FieldError
from core.labels import LabelSelector
from meshapi.registry import MeshRegistry, parse_mesh_registry, render_mesh_registry

__all__ = [
    "API_VERSION",
    "APP_PROTOCOLS",
    "KIND",
    "MTLS_MODES",
    "AppProtocol",
    "CallerRule",
    "MtlsMode",
    "Policy",
    "PolicyDocument",
    "parse_caller_rules",
    "parse_policy_document",
    "render_policy_document",
]

API_VERSION = "trellis.dev/v1alpha1"
KIND = "SidecarPolicy"
MtlsMode = Literal["STRICT", "PERMISSIVE"]
MTLS_MODES: tuple[MtlsMode, ...] = ("STRICT", "PERMISSIVE")
AppProtocol = Literal["tcp", "http"]
APP_PROTOCOLS: tuple[AppProtocol, ...] = ("tcp", "http")


@dataclass(frozen=True, slots=True)
class CallerRule:
    """One ``allow`` entry: an exact SPIFFE ID, or every ID under a path prefix."""

    spiffe_id: SpiffeId
    prefix: bool

    def allows(self, caller: SpiffeId) -> bool:
        # A prefix matches whole path segments: /ns/web allows /ns/web/x, never /ns/webhook;
        # a prefix without a path (spiffe://example.org) allows the whole trust domain.
        return caller.is_under(self.spiffe_id) if self.prefix else caller == self.spiffe_id

    def to_dict(self) -> dict[str, str]:
        return {"prefix" if self.prefix else "exact": str(self.spiffe_id)}

    def __str__(self) -> str:
        return f"{'prefix' if self.prefix else 'exact'}:{self.spiffe_id}"


@dataclass(frozen=True, slots=True)
class Policy:
    """One compiled ``AccessPolicy``: the pods it selects, their ports, who may call them."""

    name: str | None = None
    selector: LabelSelector = field(default_factory=LabelSelector)
    ports: tuple[int, ...] = ()  # empty: every port of the selected pods
    allow: tuple[CallerRule, ...] = ()  # empty: nobody (deny-all)
    mtls: MtlsMode | None = None  # None: no opinion (strict unless another policy says)
    protocol: AppProtocol | None = None  # None: tcp (a refused caller's connection is reset)


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    """A namespace's ``SidecarPolicy`` (``namespace`` and ``trust_domain`` say whose)."""

    policies: tuple[Policy, ...] = ()
    namespace: str | None = None
    trust_domain: TrustDomain | None = None
    mesh: MeshRegistry | None = None  # None: no registry published (meshapi.registry)

    def selecting(self, labels: Mapping[str, str]) -> tuple[Policy, ...]:
        """The policies whose selector matches a pod with these labels."""
        return tuple(p for p in self.policies if p.selector.matches(labels))


def parse_caller_rules(raw: Any, where: str) -> tuple[CallerRule, ...]:
    """``[{exact: ID} | {prefix: ID}, ...]``: a document's ``allow``, and the same shape in
    an ``AccessPolicy`` spec and the sidecar's YAML ``inbound.targets.*.allow``."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise FieldError(where, "expected a list of {exact: SPIFFE_ID} or {prefix: SPIFFE_ID}")
    rules: list[CallerRule] = []
    for index, item in enumerate(raw):
        at = f"{where}[{index}]"
        if not isinstance(item, Mapping) or len(item) != 1:
            raise FieldError(at, "give exactly one of exact: SPIFFE_ID or prefix: SPIFFE_ID")
        key, value = next(iter(item.items()))
        if key not in ("exact", "prefix"):
            raise FieldError(at, f"unknown key {key!r}; use exact or prefix")
        if not isinstance(value, str):
            raise FieldError(f"{at}.{key}", "expected a SPIFFE ID string")
        try:
            rules.append(CallerRule(SpiffeId(value), key == "prefix"))
        except SpiffeIdError as exc:
            raise FieldError(f"{at}.{key}", str(exc)) from exc
    return tuple(rules)


def _ports(raw: Any, where: str) -> tuple[int, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise FieldError(where, "expected a list of port numbers")
    for index, port in enumerate(raw):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise FieldError(f"{where}[{index}]", f"{port!r} is not a port number (1-65535)")
    return tuple(raw)


def _optional_string(raw: Mapping[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise FieldError(f"{where}.{key}", f"expected a non-empty string, got {value!r}")
    return value


def _policy(raw: Any, where: str) -> Policy:
    if not isinstance(raw, Mapping):
        raise FieldError(where, "expected an object with selector, ports and allow")
    mtls = raw.get("mtls")
    if mtls is not None and mtls not in MTLS_MODES:
        raise FieldError(f"{where}.mtls", f"{mtls!r} must be STRICT or PERMISSIVE")
    protocol = raw.get("protocol")
    if protocol is not None and protocol not in APP_PROTOCOLS:
        raise FieldError(f"{where}.protocol", f"{protocol!r} must be tcp or http")
    return Policy(
        name=_optional_string(raw, "name", where),
        selector=LabelSelector.parse(raw.get("selector"), f"{where}.selector"),
        ports=_ports(raw.get("ports"), f"{where}.ports"),
        allow=parse_caller_rules(raw.get("allow"), f"{where}.allow"),
        mtls=mtls,
        protocol=protocol,
    )


def parse_policy_document(raw: Any, where: str = "policy") -> PolicyDocument:
    """The document as JSON decoded it; ``FieldError`` names the JSON path under ``where``
    (``policy.policies[1].allow[0].exact``) and the rule it breaks."""
    if not isinstance(raw, Mapping):
        raise FieldError(where, f"expected a JSON object (kind {KIND})")
    for key, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        if key in raw and raw[key] != expected:
            raise FieldError(f"{where}.{key}", f"{raw[key]!r} is not {expected!r}")
    trust_domain_raw = _optional_string(raw, "trustDomain", where)
    try:
        trust_domain = None if trust_domain_raw is None else TrustDomain(trust_domain_raw)
    except SpiffeIdError as exc:
        raise FieldError(f"{where}.trustDomain", str(exc)) from exc
    policies = raw.get("policies")
    if policies is None:
        policies = []
    if not isinstance(policies, list):
        raise FieldError(f"{where}.policies", "expected a list")
    return PolicyDocument(
        policies=tuple(_policy(p, f"{where}.policies[{i}]") for i, p in enumerate(policies)),
        namespace=_optional_string(raw, "namespace", where),
        trust_domain=trust_domain,
        mesh=None if raw.get("mesh") is None else parse_mesh_registry(raw["mesh"], f"{where}.mesh"),
    )


def _render_policy(policy: Policy) -> dict[str, Any]:
    rendered: dict[str, Any] = {} if policy.name is None else {"name": policy.name}
    rendered.update(
        {
            "selector": policy.selector.to_dict(),
            "ports": list(policy.ports),
            "allow": [rule.to_dict() for rule in policy.allow],
        }
    )
    if policy.mtls is not None:
        rendered["mtls"] = policy.mtls
    if policy.protocol is not None:
        rendered["protocol"] = policy.protocol
    return rendered


def render_policy_document(document: PolicyDocument) -> dict[str, Any]:
    """The canonical JSON form (see the module docstring), ready for ``json.dumps``."""
    rendered: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND}
    if document.namespace is not None:
        rendered["namespace"] = document.namespace
    if document.trust_domain is not None:
        rendered["trustDomain"] = document.trust_domain.name
    rendered["policies"] = [_render_policy(p) for p in document.policies]
    if document.mesh is not None:
        rendered["mesh"] = render_mesh_registry(document.mesh)
    return rendered
