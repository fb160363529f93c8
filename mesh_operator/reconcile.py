"""Reconcilers as pure functions: custom resources + pods in, entries + policies + status out.

Theory of operation. The operator keeps a snapshot of what it watches (``ClusterSnapshot``:
raw objects keyed by name) and, after any change, recomputes **everything** from it:

* ``reconcile_identities`` renders every ``ClusterWorkloadIdentity`` against every pod it
  selects and returns an ``EntrySet`` (the CA server's entry model, ``ca.entries``)
  plus one status per template. Recomputing the whole set, rather than diffing events, is
  what makes a missed or reordered watch event harmless: the output depends only on the
  snapshot.
* ``compile_policies`` turns ``AccessPolicy`` objects into one document per namespace for
  the sidecars there (a ``meshapi.policy.PolicyDocument``, rendered by the module the
  sidecar parses it with), plus statuses.
* ``reconcile_federation`` lists the ``FederatedTrustDomain`` objects for the CA.
* ``mesh_registry`` lists what is in the mesh -- the pod IPs of injected pods and the
  ClusterIPs of Services selecting one -- for the ``mesh`` section of every policy
  document (``meshapi.registry``), so a transparent sidecar passes everything else
  through (``ALLOW_ANY``) or refuses it (``REGISTRY_ONLY``). With the switch set, every
  namespace holding an injected pod gets a document, AccessPolicies or not.

How a pod becomes an entry. For each selected, scheduled, non-terminal pod the template is
rendered with the pod's namespace, service account, node and labels. The entry's selectors
are exactly the facts the agent attests and the template relied on: ``k8s:ns``, ``k8s:sa``,
a ``k8s:pod-label`` for every label key the pod selector or the template names, and
``k8s:node-name`` if the template uses ``{nodeName}``. Pods that render the same ID with the
same selectors (replicas of one Deployment) share one entry, whose ``nodes`` are the nodes
they run on, so an agent can obtain an identity only where a pod that holds it is scheduled.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ca.entries import EntryError, EntrySet, RegistrationEntry, Selector
from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from mesh_operator.conditions import Condition, merge_conditions
from mesh_operator.errors import SpecError
from mesh_operator.spec import (
    AccessPolicySpec,
    FederatedTrustDomainSpec,
    IdentityTemplateSpec,
    PodFacts,
    parse_access_policy,
    parse_federated_trust_domain,
    parse_identity_template,
)
from meshapi.policy import Policy, PolicyDocument, render_policy_document
from meshapi.registry import MeshRegistry, Network, OutboundTrafficPolicy

__all__ = [
    "ClusterSnapshot",
    "IdentityResult",
    "ObjectStatus",
    "PodView",
    "PolicyResult",
    "ServiceView",
    "compile_policies",
    "entries_document",
    "federation_document",
    "mesh_registry",
    "reconcile_federation",
    "reconcile_identities",
    "status_patch",
]

_MAX_LISTED = 3  # names quoted in a condition message before "and N more"


@dataclass(frozen=True, slots=True)
class PodView:
    """The part of a pod the reconcilers read."""

    namespace: str
    name: str
    service_account: str
    node_name: str | None
    labels: Mapping[str, str]
    phase: str
    ips: tuple[str, ...] = ()  # status.podIPs (or podIP): where the mesh reaches the pod
    injected: bool = False  # the injector's trellis.dev/injected annotation is present

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> PodView:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        ips = [str(i.get("ip")) for i in status.get("podIPs") or [] if isinstance(i, Mapping)]
        if not ips and status.get("podIP"):
            ips = [str(status["podIP"])]
        return cls(
            namespace=str(meta.get("namespace", "default")),
            name=str(meta.get("name", "")),
            service_account=str(spec.get("serviceAccountName") or "default"),
            node_name=spec.get("nodeName") or None,
            labels={str(k): str(v) for k, v in labels.items()},
            phase=str(status.get("phase") or "Pending"),
            ips=tuple(ips),
            # Written by mesh_operator.injection (ANNOTATION_STATUS); named here, since the
            # reconcilers sit below the webhook.
            injected=isinstance(annotations, Mapping) and "trellis.dev/injected" in annotations,
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def eligible(self) -> bool:
        """Scheduled and not finished: a pod an agent could be asked about."""
        return self.node_name is not None and self.phase not in ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class ServiceView:
    """The part of a Service the mesh registry reads."""

    namespace: str
    name: str
    cluster_ips: tuple[str, ...]
    selector: Mapping[str, str]

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> ServiceView:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
        selector = spec.get("selector") or {}
        return cls(
            namespace=str(meta.get("namespace", "default")),
            name=str(meta.get("name", "")),
            # "None" is a headless Service: its clients dial the pod IPs, listed anyway.
            cluster_ips=tuple(str(ip) for ip in ips if ip and ip != "None"),
            selector={str(k): str(v) for k, v in selector.items()}
            if isinstance(selector, Mapping)
            else {},
        )

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ClusterSnapshot:
    """Everything the reconcilers read; raw objects exactly as the API server sent them."""

    trust_domain: TrustDomain
    templates: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    policies: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # "ns/name"
    federations: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # name -> labels
    pods: Mapping[str, PodView] = field(default_factory=dict)  # "ns/name"
    services: Mapping[str, ServiceView] = field(default_factory=dict)  # "ns/name"
    # None: no mesh registry is published (every destination stays a CONNECT).
    outbound_traffic_policy: OutboundTrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class ObjectStatus:
    """What to write to one object's status subresource (besides the conditions' times)."""

    conditions: tuple[Condition, ...]
    fields: Mapping[str, Any]
    generation: int

    @property
    def ready(self) -> bool:
        return any(c.type == "Ready" and c.status == "True" for c in self.conditions)


@dataclass(frozen=True)
class IdentityResult:
    entries: EntrySet
    statuses: Mapping[str, ObjectStatus]  # template name -> status


@dataclass(frozen=True)
class PolicyResult:
    documents: Mapping[str, Mapping[str, Any]]  # namespace -> rendered SidecarPolicy
    statuses: Mapping[str, ObjectStatus]  # "ns/name" -> status


def _names(items: list[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _generation(obj: Mapping[str, Any]) -> int:
    meta = obj.get("metadata") or {}
    value = meta.get("generation", 0) if isinstance(meta, Mapping) else 0
    return value if isinstance(value, int) else 0


def _invalid(error: SpecError, generation: int) -> ObjectStatus:
    message = f"{error.field}: {error.reason}. Fix the field; nothing is issued until then."
    return ObjectStatus(
        (
            Condition.of("Valid", False, "InvalidSpec", message),
            Condition.of("Ready", False, "InvalidSpec", message),
        ),
        {},
        generation,
    )


def _selected_pods(template: IdentityTemplateSpec, snapshot: ClusterSnapshot) -> list[PodView]:
    return [
        pod
        for pod in snapshot.pods.values()
        if pod.eligible
        and template.namespace_selector.matches(snapshot.namespaces.get(pod.namespace, {}))
        and template.pod_selector.matches(pod.labels)
    ]


@dataclass
class _Draft:
    """One would-be entry and where it came from."""

    template: IdentityTemplateSpec
    spiffe_id: SpiffeId
    selectors: frozenset[Selector]
    dns_names: tuple[str, ...]
    nodes: set[str] = field(default_factory=set)
    pods: list[str] = field(default_factory=list)


def _render(
    template: IdentityTemplateSpec, pod: PodView, trust_domain: TrustDomain
) -> tuple[SpiffeId, frozenset[Selector], tuple[str, ...]]:
    """The ID, selectors and DNS names for one pod; ``ValueError`` says why it cannot."""
    assert pod.node_name is not None
    facts = PodFacts(
        trust_domain.name, pod.namespace, pod.service_account, pod.node_name, pod.labels
    )
    keys = dict.fromkeys([*template.pod_selector.keys, *template.spiffe_id_template.label_keys])
    for dns in template.dns_name_templates:
        keys.update(dict.fromkeys(dns.label_keys))
    missing = [k for k in keys if k not in pod.labels]
    if missing:
        raise ValueError(f"pod {pod.key} has no label {missing[0]!r}, which the template uses")
    try:
        spiffe_id = SpiffeId(template.spiffe_id_template.render(facts))
    except SpiffeIdError as exc:
        raise ValueError(f"pod {pod.key} renders an invalid SPIFFE ID: {exc}") from exc
    selectors = {
        Selector("k8s", "ns", pod.namespace),
        Selector("k8s", "sa", pod.service_account),
        *(Selector("k8s", "pod-label", f"{k}:{pod.labels[k]}") for k in keys),
    }
    uses_node = "nodeName" in template.spiffe_id_template.fields or any(
        "nodeName" in d.fields for d in template.dns_name_templates
    )
    if uses_node:
        selectors.add(Selector("k8s", "node-name", pod.node_name))
    dns_names = tuple(dict.fromkeys(d.render(facts).lower() for d in template.dns_name_templates))
    return spiffe_id, frozenset(selectors), dns_names


def reconcile_identities(snapshot: ClusterSnapshot) -> IdentityResult:
    """Render every template against the pods it selects (see the module docstring)."""
    statuses: dict[str, ObjectStatus] = {}
    parsed: list[IdentityTemplateSpec] = []
    for name in sorted(snapshot.templates):
        obj = snapshot.templates[name]
        try:
            parsed.append(parse_identity_template(obj))
        except SpecError as exc:
            statuses[name] = _invalid(exc, _generation(obj))

    known_domains = set()
    for obj in snapshot.federations.values():
        try:
            known_domains.add(parse_federated_trust_domain(obj).trust_domain)
        except SpecError:
            continue

    drafts: dict[tuple[SpiffeId, frozenset[Selector]], _Draft] = {}
    render_errors: dict[str, list[str]] = defaultdict(list)
    conflicts: dict[str, list[str]] = defaultdict(list)
    ids_by_pod: dict[str, dict[SpiffeId, str]] = defaultdict(dict)
    selected: dict[str, list[PodView]] = {}
    for template in parsed:
        name = template.ref.name
        selected[name] = _selected_pods(template, snapshot)
        for pod in sorted(selected[name], key=lambda p: p.key):
            assert pod.node_name is not None
            try:
                spiffe_id, selectors, dns_names = _render(template, pod, snapshot.trust_domain)
            except ValueError as exc:
                render_errors[name].append(str(exc))
                continue
            ids_by_pod[pod.key].setdefault(spiffe_id, name)
            draft = drafts.get((spiffe_id, selectors))
            if draft is None:
                draft = drafts[(spiffe_id, selectors)] = _Draft(
                    template, spiffe_id, selectors, dns_names
                )
            elif draft.template.ref.name != name:
                owner = draft.template
                if (
                    owner.x509_svid_ttl,
                    owner.jwt_svid_ttl,
                    owner.federates_with,
                    owner.hint,
                ) != (
                    template.x509_svid_ttl,
                    template.jwt_svid_ttl,
                    template.federates_with,
                    template.hint,
                ) or draft.dns_names != dns_names:
                    conflicts[name].append(
                        f"pod {pod.key} gets the same entry ({spiffe_id}) from "
                        f"ClusterWorkloadIdentity {owner.ref.name} with different settings; "
                        f"{owner.ref.name}'s settings win (first by name)"
                    )
                    continue
            draft.nodes.add(pod.node_name)
            draft.pods.append(pod.key)

    overlaps: dict[str, list[str]] = defaultdict(list)
    for pod_key, ids in ids_by_pod.items():
        if len(ids) > 1:
            owners = sorted(set(ids.values()))
            for owner_name in owners:
                others = [o for o in owners if o != owner_name]
                if others:
                    overlaps[owner_name].append(
                        f"pod {pod_key} is also selected by ClusterWorkloadIdentity "
                        f"{_names(others)}, so it receives {len(ids)} identities "
                        f"({_names([str(i) for i in ids])})"
                    )

    entries: list[RegistrationEntry] = []
    entry_counts: dict[str, int] = defaultdict(int)
    for (spiffe_id, selectors), draft in sorted(drafts.items(), key=lambda kv: str(kv[0][0])):
        template = draft.template
        try:
            entries.append(
                RegistrationEntry.create(
                    spiffe_id,
                    selectors,
                    nodes=sorted(draft.nodes),
                    x509_svid_ttl=template.x509_svid_ttl,
                    jwt_svid_ttl=template.jwt_svid_ttl,
                    dns_names=draft.dns_names,
                    federates_with=template.federates_with,
                    hint=template.hint,
                )
            )
            entry_counts[template.ref.name] += 1
        except EntryError as exc:
            render_errors[template.ref.name].append(f"pods {_names(draft.pods)}: {exc}")

    for template in parsed:
        name = template.ref.name
        pods = selected[name]
        namespaces = sorted({p.namespace for p in pods})
        conditions = [Condition.of("Valid", True, "Valid", "The spec is valid.")]
        if pods:
            conditions.append(
                Condition.of(
                    "PodsSelected",
                    True,
                    "PodsSelected",
                    f"{len(pods)} scheduled pod(s) in namespace(s) {_names(namespaces)}.",
                )
            )
        else:
            conditions.append(
                Condition.of(
                    "PodsSelected",
                    False,
                    "NoPodsSelected",
                    f"No scheduled pod matches podSelector {template.pod_selector} in "
                    f"namespaces matching namespaceSelector {template.namespace_selector}. "
                    "Check the pods' labels and the namespaces' labels.",
                )
            )
        problems = overlaps.get(name, []) + conflicts.get(name, [])
        conditions.append(
            Condition.of(
                "Overlapping",
                bool(problems),
                "OverlappingEntries" if problems else "NoOverlap",
                (
                    "; ".join(problems[:_MAX_LISTED])
                    + ". Narrow podSelector or namespaceSelector so one template selects "
                    "each pod."
                )
                if problems
                else "No other ClusterWorkloadIdentity selects these pods.",
            )
        )
        unknown = [td.name for td in template.federates_with if td not in known_domains]
        if template.federates_with:
            conditions.append(
                Condition.of(
                    "FederationResolved",
                    not unknown,
                    "UnknownTrustDomain" if unknown else "Resolved",
                    f"federatesWith names {_names(unknown)} but no FederatedTrustDomain "
                    "defines it; create one or remove the name."
                    if unknown
                    else "Every federated trust domain is defined.",
                )
            )
        errors = render_errors.get(name, [])
        if errors:
            conditions.append(
                Condition.of(
                    "Ready",
                    False,
                    "RenderFailed",
                    f"{len(errors)} pod(s) got no entry: {'; '.join(errors[:_MAX_LISTED])}. "
                    "Add the label to the pods or drop it from the template.",
                )
            )
        else:
            conditions.append(
                Condition.of(
                    "Ready",
                    True,
                    "EntriesPublished",
                    f"{entry_counts[name]} registration entr"
                    f"{'y' if entry_counts[name] == 1 else 'ies'} published to the CA.",
                )
            )
        statuses[name] = ObjectStatus(
            tuple(conditions),
            {"selectedPods": len(pods), "entries": entry_counts[name]},
            template.ref.generation,
        )
    return IdentityResult(EntrySet(tuple(entries)), statuses)


def entries_document(entries: EntrySet) -> dict[str, Any]:
    """The document ``ca.entries.parse_entries`` reads back (the CA's --entries file)."""
    return {"entries": [e.to_dict() for e in sorted(entries, key=lambda e: e.entry_id)]}


def _host_network(ip: str) -> Network | None:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None  # the API server validates podIPs; nothing else gets this far
    return ipaddress.ip_network(address)


def mesh_registry(snapshot: ClusterSnapshot, policy: OutboundTrafficPolicy) -> MeshRegistry:
    """The destinations that have a sidecar: every injected, running pod's IPs, and the
    ClusterIPs of Services whose selector picks one in their namespace. A Service
    without a selector (endpoints kept by hand, often something outside the cluster) is
    not listed: nothing says a sidecar answers there."""
    injected = [p for p in snapshot.pods.values() if p.injected and p.eligible]
    networks: list[Network] = []
    for pod in injected:
        networks.extend(n for n in map(_host_network, pod.ips) if n is not None)
    for service in snapshot.services.values():
        if not service.selector:
            continue
        if any(
            p.namespace == service.namespace
            and all(p.labels.get(k) == v for k, v in service.selector.items())
            for p in injected
        ):
            networks.extend(n for n in map(_host_network, service.cluster_ips) if n is not None)
    return MeshRegistry(tuple(networks), policy)


def compile_policies(snapshot: ClusterSnapshot) -> PolicyResult:
    """One sidecar policy document per namespace that has AccessPolicies, plus statuses.

    The document carries each policy's selector; the sidecar matches it against its own
    pod's labels (from the downward API volume the injector mounts), so a pod relabelled
    later needs no new document.
    """
    statuses: dict[str, ObjectStatus] = {}
    by_namespace: dict[str, list[AccessPolicySpec]] = defaultdict(list)
    for key in sorted(snapshot.policies):
        obj = snapshot.policies[key]
        try:
            policy = parse_access_policy(obj)
        except SpecError as exc:
            statuses[key] = _invalid(exc, _generation(obj))
            continue
        assert policy.ref.namespace is not None
        by_namespace[policy.ref.namespace].append(policy)
        pods = [
            p
            for p in snapshot.pods.values()
            if p.namespace == policy.ref.namespace
            and p.eligible
            and policy.selector.matches(p.labels)
        ]
        conditions = [Condition.of("Valid", True, "Valid", "The spec is valid.")]
        conditions.append(
            Condition.of(
                "PodsSelected",
                bool(pods),
                "PodsSelected" if pods else "NoPodsSelected",
                f"Protects {len(pods)} pod(s)."
                if pods
                else f"selector {policy.selector} matches no scheduled pod in namespace "
                f"{policy.ref.namespace}; check the workloads' labels.",
            )
        )
        if policy.allow:
            ready = Condition.of(
                "Ready", True, "Published", "Published to the namespace's sidecars."
            )
        else:
            ready = Condition.of(
                "Ready",
                True,
                "DenyAll",
                "allow is empty: every caller is refused (HTTP/2 403). Add exact or prefix "
                "rules to let callers in.",
            )
        conditions.append(ready)
        statuses[key] = ObjectStatus(
            tuple(conditions), {"selectedPods": len(pods)}, policy.ref.generation
        )

    registry: MeshRegistry | None = None
    if snapshot.outbound_traffic_policy is not None:
        registry = mesh_registry(snapshot, snapshot.outbound_traffic_policy)
        for pod in snapshot.pods.values():
            if pod.injected and pod.eligible:
                by_namespace.setdefault(pod.namespace, [])
    documents: dict[str, dict[str, Any]] = {}
    for namespace, policies in sorted(by_namespace.items()):
        document = PolicyDocument(
            policies=tuple(
                Policy(
                    name=p.ref.name,
                    selector=p.selector,
                    ports=p.ports,
                    allow=p.allow,
                    mtls=p.mtls,
                    protocol=p.protocol,
                )
                for p in policies
            ),
            namespace=namespace,
            trust_domain=snapshot.trust_domain,
            mesh=registry,
        )
        documents[namespace] = render_policy_document(document)
    return PolicyResult(documents, statuses)


def reconcile_federation(
    snapshot: ClusterSnapshot,
) -> tuple[list[FederatedTrustDomainSpec], dict[str, ObjectStatus]]:
    """Valid federation relationships (one per trust domain) and every object's status."""
    statuses: dict[str, ObjectStatus] = {}
    chosen: dict[TrustDomain, FederatedTrustDomainSpec] = {}
    for name in sorted(snapshot.federations):
        obj = snapshot.federations[name]
        try:
            spec = parse_federated_trust_domain(obj)
        except SpecError as exc:
            statuses[name] = _invalid(exc, _generation(obj))
            continue
        if spec.trust_domain == snapshot.trust_domain:
            error = SpecError(
                "spec.trustDomain", f"{spec.trust_domain} is this cluster's own trust domain"
            )
            statuses[name] = _invalid(error, spec.ref.generation)
            continue
        first = chosen.setdefault(spec.trust_domain, spec)
        if first is not spec:
            message = (
                f"FederatedTrustDomain {first.ref.name} already defines {spec.trust_domain}; "
                "delete one of them."
            )
            conditions: tuple[Condition, ...] = (
                Condition.of("Valid", True, "Valid", "The spec is valid."),
                Condition.of("Ready", False, "Duplicate", message),
            )
        else:
            conditions = (
                Condition.of("Valid", True, "Valid", "The spec is valid."),
                Condition.of(
                    "Ready", True, "Published", f"Bundle of {spec.trust_domain} published."
                ),
            )
        statuses[name] = ObjectStatus(conditions, {}, spec.ref.generation)
    return list(chosen.values()), statuses


def federation_document(specs: list[FederatedTrustDomainSpec]) -> dict[str, Any]:
    return {
        "trustDomains": [
            {
                "trustDomain": s.trust_domain.name,
                "bundleEndpointURL": s.bundle_endpoint_url,
                "bundleEndpointSPIFFEID": str(s.bundle_endpoint_spiffe_id),
                "bootstrapBundle": s.bootstrap_bundle,
            }
            for s in sorted(specs, key=lambda s: s.trust_domain.name)
        ]
    }


def status_patch(status: ObjectStatus, previous: Any, *, now: dt.datetime) -> dict[str, Any]:
    """The ``status`` body for one object, keeping unchanged conditions' transition times."""

    old = previous.get("conditions") if isinstance(previous, Mapping) else None
    return {
        **status.fields,
        "observedGeneration": status.generation,
        "conditions": merge_conditions(
            old, status.conditions, generation=status.generation, now=now
        ),
    }
