"""The three custom resources as typed, frozen values, parsed at the edge.

Group ``trellis.dev``, version ``v1alpha1``:

* ``ClusterWorkloadIdentity`` (cluster-scoped, like SPIRE's ClusterSPIFFEID): which pods get
  which SPIFFE ID, rendered from ``spiffeIDTemplate``.
* ``AccessPolicy`` (namespaced): which SPIFFE IDs may call the selected workloads.
* ``FederatedTrustDomain`` (cluster-scoped): a foreign trust domain and its bundle endpoint.

``parse_*`` take the object's JSON (as the API server or an AdmissionReview hands it over)
and return a value or raise ``SpecError`` naming the field and the rule a user broke. The
OpenAPI schema in the CRD already rejects wrong types; these parsers also enforce what a
schema cannot say (the template renders to a valid SPIFFE ID, TTL <= 24 h, only attestable
pod selectors), so the validating webhook and the reconciler share one definition of
"valid".
"""

from __future__ import annotations

import datetime as dt
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ca.bundle import BundleError, TrustBundle, load_pem_certificates
from ca.entries import MAX_HINT_CHARS
from ca.jwtsvid import DEFAULT_JWT_SVID_TTL, MAX_JWT_SVID_TTL
from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from ca.x509svid import DEFAULT_X509_SVID_TTL, MAX_X509_SVID_TTL
from core.durations import format_duration, parse_duration
from core.labels import LabelSelector, check_label_key
from mesh_operator.errors import SpecError
from meshapi.policy import (
    APP_PROTOCOLS,
    MTLS_MODES,
    AppProtocol,
    CallerRule,
    MtlsMode,
    parse_caller_rules,
)

__all__ = [
    "API_VERSION",
    "DEFAULT_SPIFFE_ID_TEMPLATE",
    "GROUP",
    "VERSION",
    "AccessPolicySpec",
    "AllowedCaller",
    "FederatedTrustDomainSpec",
    "IdentityTemplateSpec",
    "ObjectRef",
    "PodFacts",
    "Template",
    "parse_access_policy",
    "parse_federated_trust_domain",
    "parse_identity_template",
]

GROUP = "trellis.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_SPIFFE_ID_TEMPLATE = "spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}"
_MAX_TEMPLATE = 2048
_SAMPLE_TRUST_DOMAIN = TrustDomain("example.org")


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """Which object a spec came from: for messages and status."""

    kind: str
    name: str
    namespace: str | None = None
    generation: int = 0

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}"


@dataclass(frozen=True, slots=True)
class PodFacts:
    """The facts a template may use; each is attested by the agent as a selector."""

    trust_domain: str
    namespace: str
    service_account: str
    node_name: str
    labels: Mapping[str, str]


# --- templates ---------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"^(trustDomain|namespace|serviceAccount|nodeName|podLabel:(.+))$")


def _placeholder_name(field_name: str, spec: str | None) -> str:
    # str.format syntax reads "{podLabel:app}" as field "podLabel" with format spec "app".
    return f"{field_name}:{spec}" if spec else field_name


@dataclass(frozen=True, slots=True)
class Template:
    """A ``{placeholder}`` template; only facts the agent can attest may appear.

    ``{podName}`` or a pod UID are refused on purpose: the agent attests namespace, service
    account, labels and node, so an ID naming one pod could be obtained by its siblings.
    """

    text: str
    fields: tuple[str, ...]

    @classmethod
    def parse(cls, text: Any, where: str) -> Template:
        if not isinstance(text, str) or not text:
            raise SpecError(where, "expected a non-empty string")
        if len(text) > _MAX_TEMPLATE:
            raise SpecError(where, f"longer than {_MAX_TEMPLATE} characters")
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise SpecError(where, f"unbalanced braces ({exc}); write {{namespace}}") from exc
        for _literal, field_name, spec, conversion in parsed:
            if field_name is None:
                continue
            name = _placeholder_name(field_name, spec)
            if conversion:
                raise SpecError(where, f"{{{name}!{conversion}}}: conversions are not allowed")
            match = _PLACEHOLDER.match(name)
            if not match:
                raise SpecError(
                    where,
                    f"unknown placeholder {{{name}}}; use {{trustDomain}}, {{namespace}}, "
                    "{serviceAccount}, {nodeName} or {podLabel:KEY} (pod names and UIDs "
                    "cannot be attested, so they cannot name an identity)",
                )
            if match.group(2) is not None:
                check_label_key(match.group(2), f"{where}: {{{name}}}")
            fields.append(name)
        return cls(text, tuple(fields))

    @property
    def label_keys(self) -> tuple[str, ...]:
        return tuple(f.partition(":")[2] for f in self.fields if f.startswith("podLabel:"))

    def render(self, pod: PodFacts) -> str:
        """The text with every placeholder filled; ``KeyError`` names a missing pod label."""
        values = {
            "trustDomain": pod.trust_domain,
            "namespace": pod.namespace,
            "serviceAccount": pod.service_account,
            "nodeName": pod.node_name,
        }
        out: list[str] = []
        for literal, field_name, spec, _conv in string.Formatter().parse(self.text):
            out.append(literal)
            if field_name is None:
                continue
            name = _placeholder_name(field_name, spec)
            if name.startswith("podLabel:"):
                out.append(pod.labels[name.partition(":")[2]])
            else:
                out.append(values[name])
        return "".join(out)


def _sample_pod(template: Template) -> PodFacts:
    return PodFacts(
        trust_domain=_SAMPLE_TRUST_DOMAIN.name,
        namespace="default",
        service_account="default",
        node_name="node-1",
        labels=dict.fromkeys(template.label_keys, "value"),
    )


# --- ClusterWorkloadIdentity -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdentityTemplateSpec:
    ref: ObjectRef
    spiffe_id_template: Template
    pod_selector: LabelSelector
    namespace_selector: LabelSelector
    x509_svid_ttl: dt.timedelta
    jwt_svid_ttl: dt.timedelta
    dns_name_templates: tuple[Template, ...]
    federates_with: tuple[TrustDomain, ...]
    hint: str = ""


def _spec_of(obj: Any, kind: str) -> tuple[ObjectRef, Mapping[str, Any]]:
    if not isinstance(obj, Mapping):
        raise SpecError(kind, "expected a JSON object")
    meta = obj.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise SpecError("metadata.name", "required")
    namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
    generation = meta.get("generation", 0) if isinstance(meta, Mapping) else 0
    spec = obj.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise SpecError("spec", "expected an object")
    ref = ObjectRef(
        kind,
        name,
        namespace if isinstance(namespace, str) else None,
        generation if isinstance(generation, int) else 0,
    )
    return ref, spec


def _ttl(raw: Any, default: dt.timedelta, limit: dt.timedelta, where: str) -> dt.timedelta:
    if raw is None:
        return default
    if not isinstance(raw, str):
        raise SpecError(where, "expected a duration such as 1h or 90m")
    try:
        value = parse_duration(raw)
    except ValueError as exc:
        raise SpecError(where, str(exc)) from exc
    if value > limit:
        # In the CRD's own duration syntax: str(timedelta) reads "1 day, 0:00:00" in kubectl.
        raise SpecError(
            where,
            f"{raw} is longer than the maximum of {format_duration(limit)} (SVIDs live <= 24h)",
        )
    if value < dt.timedelta(minutes=1):
        raise SpecError(where, f"{raw} is shorter than one minute; agents could not keep up")
    return value


def _strings(raw: Any, where: str) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise SpecError(where, "expected a list of strings")
    return list(raw)


def _hint(raw: Any) -> str:
    # The CA's rule for an entry's hint (ca.entries): checked here too, so a bad
    # hint is refused at admission with the field's name instead of failing every entry the
    # template renders. The CRD's pattern can only approximate str.isprintable.
    field = "spec.hint"
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise SpecError(field, "expected a string such as internal or external")
    if len(raw) > MAX_HINT_CHARS:
        raise SpecError(field, f"{len(raw)} characters; at most {MAX_HINT_CHARS}")
    if not raw.isprintable() or raw != raw.strip():
        raise SpecError(
            field,
            f"{raw[:40]!r} must be printable characters, without control characters or "
            "leading or trailing spaces",
        )
    return raw


def parse_identity_template(obj: Any) -> IdentityTemplateSpec:
    ref, spec = _spec_of(obj, "ClusterWorkloadIdentity")
    template = Template.parse(
        spec.get("spiffeIDTemplate", DEFAULT_SPIFFE_ID_TEMPLATE), "spec.spiffeIDTemplate"
    )
    sample = template.render(_sample_pod(template))
    try:
        rendered = SpiffeId(sample)
    except SpiffeIdError as exc:
        raise SpecError(
            "spec.spiffeIDTemplate", f"renders to {sample!r}, not a valid SPIFFE ID: {exc}"
        ) from exc
    if not rendered.path:
        raise SpecError("spec.spiffeIDTemplate", f"renders to {sample!r}, which has no path")
    if not template.text.startswith("spiffe://{trustDomain}/"):
        raise SpecError(
            "spec.spiffeIDTemplate",
            "must start with spiffe://{trustDomain}/ : the cluster CA signs only its own "
            "trust domain",
        )
    if rendered.path.startswith("/trellis/"):
        raise SpecError("spec.spiffeIDTemplate", "paths under /trellis/ are reserved for agents")
    pod_selector = LabelSelector.parse(spec.get("podSelector"), "spec.podSelector")
    for requirement in pod_selector.requirements:
        if not requirement.positive:
            raise SpecError(
                "spec.podSelector",
                f"{requirement} selects pods by a label they lack; the agent attests labels "
                "a pod carries, so use In or Exists (or narrow namespaceSelector instead)",
            )
    dns_templates: list[Template] = []
    for index, text in enumerate(_strings(spec.get("dnsNameTemplates"), "spec.dnsNameTemplates")):
        at = f"spec.dnsNameTemplates[{index}]"
        dns = Template.parse(text, at)
        if "trustDomain" in dns.fields:
            raise SpecError(at, "{trustDomain} is not a DNS name; use the service's DNS name")
        dns_templates.append(dns)
    federated: list[TrustDomain] = []
    for index, name in enumerate(_strings(spec.get("federatesWith"), "spec.federatesWith")):
        try:
            federated.append(TrustDomain(name))
        except SpiffeIdError as exc:
            raise SpecError(f"spec.federatesWith[{index}]", str(exc)) from exc
    return IdentityTemplateSpec(
        ref=ref,
        spiffe_id_template=template,
        pod_selector=pod_selector,
        namespace_selector=LabelSelector.parse(
            spec.get("namespaceSelector"), "spec.namespaceSelector"
        ),
        x509_svid_ttl=_ttl(spec.get("ttl"), DEFAULT_X509_SVID_TTL, MAX_X509_SVID_TTL, "spec.ttl"),
        jwt_svid_ttl=_ttl(
            spec.get("jwtTTL"), DEFAULT_JWT_SVID_TTL, MAX_JWT_SVID_TTL, "spec.jwtTTL"
        ),
        dns_name_templates=tuple(dns_templates),
        federates_with=tuple(dict.fromkeys(federated)),
        hint=_hint(spec.get("hint")),
    )


# --- AccessPolicy ------------------------------------------------------------------------


# One caller rule: an exact SPIFFE ID, or every ID under a path prefix. The rule type of the
# sidecar's policy document, so what the operator parses is what it renders for the sidecar.
AllowedCaller = CallerRule


@dataclass(frozen=True, slots=True)
class AccessPolicySpec:
    ref: ObjectRef
    selector: LabelSelector
    ports: tuple[int, ...]
    allow: tuple[CallerRule, ...]
    mtls: MtlsMode | None  # None: the spec names no mode (strict unless another policy says)
    # What the selected pods' apps speak on these ports; http lets a refused caller's sidecar
    # answer its app 403 Forbidden naming this policy (None: tcp, the connection is reset).
    protocol: AppProtocol | None = None


def parse_access_policy(obj: Any) -> AccessPolicySpec:
    ref, spec = _spec_of(obj, "AccessPolicy")
    if ref.namespace is None:
        raise SpecError("metadata.namespace", "an AccessPolicy is namespaced")
    ports_raw = spec.get("ports") or []
    if not isinstance(ports_raw, list):
        raise SpecError("spec.ports", "expected a list of port numbers")
    ports: list[int] = []
    for index, port in enumerate(ports_raw):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise SpecError(f"spec.ports[{index}]", f"{port!r} is not a port number (1-65535)")
        ports.append(port)
    allow = parse_caller_rules(spec.get("allow") or [], "spec.allow")
    mtls = spec.get("mtls")
    if mtls is not None and mtls not in MTLS_MODES:
        raise SpecError("spec.mtls", f"{mtls!r} must be STRICT or PERMISSIVE")
    protocol = spec.get("protocol")
    if protocol is not None and protocol not in APP_PROTOCOLS:
        raise SpecError("spec.protocol", f"{protocol!r} must be tcp or http")
    return AccessPolicySpec(
        ref=ref,
        selector=LabelSelector.parse(spec.get("selector"), "spec.selector"),
        ports=tuple(sorted(set(ports))),
        allow=allow,
        mtls=mtls,
        protocol=protocol,
    )


# --- FederatedTrustDomain ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FederatedTrustDomainSpec:
    ref: ObjectRef
    trust_domain: TrustDomain
    bundle_endpoint_url: str
    bundle_endpoint_spiffe_id: SpiffeId
    # The foreign domain's bundle (SPIFFE bundle JSON or PEM roots) as written in the
    # spec: the CA needs it to authenticate the endpoint before its first fetch.
    bootstrap_bundle: str


MAX_BOOTSTRAP_BUNDLE_BYTES = 256 * 1024


def _bootstrap_bundle(spec: Mapping[str, Any], trust_domain: TrustDomain) -> str:
    field = "spec.bootstrapBundle"
    raw = spec.get("bootstrapBundle")
    if not isinstance(raw, str) or not raw.strip():
        raise SpecError(
            field,
            f"required: {trust_domain}'s bundle (SPIFFE bundle JSON or PEM roots); the "
            "https_spiffe profile needs it to authenticate the endpoint before the first fetch",
        )
    if len(raw.encode()) > MAX_BOOTSTRAP_BUNDLE_BYTES:
        raise SpecError(field, f"longer than {MAX_BOOTSTRAP_BUNDLE_BYTES} bytes")
    try:
        if raw.lstrip().startswith("{"):
            bundle = TrustBundle.from_json(trust_domain, raw)
        else:
            bundle = TrustBundle(trust_domain, tuple(load_pem_certificates(raw.encode())))
    except BundleError as exc:
        raise SpecError(field, str(exc)) from exc
    if not bundle.x509_authorities:
        raise SpecError(field, "holds no X.509 authority")
    return raw


def parse_federated_trust_domain(obj: Any) -> FederatedTrustDomainSpec:
    ref, spec = _spec_of(obj, "FederatedTrustDomain")
    raw_td = spec.get("trustDomain")
    if not isinstance(raw_td, str):
        raise SpecError("spec.trustDomain", "required: the foreign trust domain's name")
    try:
        trust_domain = TrustDomain(raw_td)
    except SpiffeIdError as exc:
        raise SpecError("spec.trustDomain", str(exc)) from exc
    url = spec.get("bundleEndpointURL")
    if not isinstance(url, str):
        raise SpecError("spec.bundleEndpointURL", "required: the https:// bundle endpoint")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise SpecError(
            "spec.bundleEndpointURL",
            f"{url!r} must be an https:// URL (SPIFFE federation uses https_spiffe)",
        )
    raw_id = spec.get("bundleEndpointSPIFFEID")
    if not isinstance(raw_id, str):
        raise SpecError("spec.bundleEndpointSPIFFEID", "required: the endpoint server's SPIFFE ID")
    try:
        endpoint_id = SpiffeId(raw_id)
    except SpiffeIdError as exc:
        raise SpecError("spec.bundleEndpointSPIFFEID", str(exc)) from exc
    if endpoint_id.trust_domain != trust_domain:
        raise SpecError(
            "spec.bundleEndpointSPIFFEID",
            f"{endpoint_id} is not in {trust_domain}; https_spiffe endpoints present an ID "
            "of the domain whose bundle they serve",
        )
    bootstrap = _bootstrap_bundle(spec, trust_domain)
    return FederatedTrustDomainSpec(ref, trust_domain, url, endpoint_id, bootstrap)
