"""manifests/ applied to a real kube-apiserver, and every schema and CEL rule enforced by it.

``kubectl apply -k manifests/ --server-side`` is what the README tells a user to run; the
real API server, not a schema validator in the tests, decides whether the CRDs are
structural, whether their CEL compiles within its cost budget, and what it answers for
an object that breaks a rule. Each rule has its own case: one object breaking exactly
that rule, created with ``dryRun=All`` (validated in full, never stored), and the part of
the API server's message that names the rule.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from .conftest import MANIFESTS, Installed

GROUP = "trellis.dev"
CRDS = ("clusterworkloadidentities", "accesspolicies", "federatedtrustdomains")

CWI: dict[str, Any] = {
    "apiVersion": "trellis.dev/v1alpha1",
    "kind": "ClusterWorkloadIdentity",
    "metadata": {"name": "rule-check"},
    "spec": {"spiffeIDTemplate": "spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}"},
}
POLICY: dict[str, Any] = {
    "apiVersion": "trellis.dev/v1alpha1",
    "kind": "AccessPolicy",
    "metadata": {"name": "rule-check", "namespace": "default"},
    "spec": {"mtls": "PERMISSIVE", "allow": [{"exact": "spiffe://example.org/ns/a/sa/b"}]},
}
FEDERATION: dict[str, Any] = {
    "apiVersion": "trellis.dev/v1alpha1",
    "kind": "FederatedTrustDomain",
    "metadata": {"name": "rule-check"},
    "spec": {
        "trustDomain": "partner.example",
        "bundleEndpointURL": "https://bundle.partner.example/",
        "bundleEndpointSPIFFEID": "spiffe://partner.example/bundle",
        "bootstrapBundle": "{}",
    },
}


def _with(base: dict[str, Any], **spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(base)
    for key, value in spec.items():
        if value is None:
            obj["spec"].pop(key, None)
        else:
            obj["spec"][key] = value
    return obj


# (object breaking one rule, what the API server's refusal must say)
RULES: dict[str, tuple[dict[str, Any], str]] = {
    "identity_template_must_name_the_trust_domain": (
        _with(CWI, spiffeIDTemplate="spiffe://other.org/x"),
        "spec.spiffeIDTemplate: Invalid value",
    ),
    "identity_template_may_not_be_empty": (
        _with(CWI, spiffeIDTemplate=""),
        "spec.spiffeIDTemplate in body should be at least 1 chars long",
    ),
    "identity_template_is_at_most_2048_characters": (
        _with(CWI, spiffeIDTemplate="spiffe://{trustDomain}/" + "a" * 2048),
        "spec.spiffeIDTemplate: Too long: may not be more than 2048",
    ),
    "identity_selector_operator_is_one_of_four": (
        _with(CWI, podSelector={"matchExpressions": [{"key": "app", "operator": "Like"}]}),
        'spec.podSelector.matchExpressions[0].operator: Unsupported value: "Like"',
    ),
    "identity_selector_expression_needs_a_key": (
        _with(CWI, namespaceSelector={"matchExpressions": [{"operator": "Exists"}]}),
        "spec.namespaceSelector.matchExpressions[0].key: Required value",
    ),
    "identity_ttl_is_a_duration": (
        _with(CWI, ttl="1 hour"),
        "spec.ttl: Invalid value",
    ),
    "identity_jwt_ttl_is_a_duration": (
        _with(CWI, jwtTTL="5"),
        "spec.jwtTTL: Invalid value",
    ),
    "identity_has_at_most_32_dns_name_templates": (
        _with(CWI, dnsNameTemplates=[f"n{i}.example" for i in range(33)]),
        "spec.dnsNameTemplates: Too many: 33: must have at most 32 items",
    ),
    "identity_dns_name_template_is_at_most_253_characters": (
        _with(CWI, dnsNameTemplates=["a" * 254]),
        "spec.dnsNameTemplates[0]: Too long: may not be more than 253",
    ),
    "identity_federates_with_each_domain_once": (
        _with(CWI, federatesWith=["partner.example", "partner.example"]),
        'spec.federatesWith[1]: Duplicate value: "partner.example"',
    ),
    "identity_federates_with_at_most_32_domains": (
        _with(CWI, federatesWith=[f"d{i}.example" for i in range(33)]),
        "spec.federatesWith: Too many: 33: must have at most 32 items",
    ),
    "identity_federated_domain_is_at_most_255_characters": (
        _with(CWI, federatesWith=["d" * 256]),
        "spec.federatesWith[0]: Too long: may not be more than 255",
    ),
    "identity_hint_is_at_most_128_characters": (
        _with(CWI, hint="h" * 129),
        "spec.hint: Too long: may not be more than 128",
    ),
    "identity_hint_has_no_control_characters_or_edge_spaces": (
        _with(CWI, hint=" internal"),
        "spec.hint: Invalid value",
    ),
    "identity_needs_a_spec": (
        {k: v for k, v in CWI.items() if k != "spec"},
        "spec: Required value",
    ),
    "policy_mtls_is_strict_or_permissive": (
        _with(POLICY, mtls="DISABLE"),
        'spec.mtls: Unsupported value: "DISABLE"',
    ),
    "policy_mtls_is_upper_case_as_written": (
        _with(POLICY, mtls="permissive"),
        'spec.mtls: Unsupported value: "permissive"',
    ),
    "policy_port_is_at_least_1": (
        _with(POLICY, ports=[0]),
        "spec.ports[0] in body should be greater than or equal to 1",
    ),
    "policy_port_is_at_most_65535": (
        _with(POLICY, ports=[65536]),
        "spec.ports[0] in body should be less than or equal to 65535",
    ),
    "policy_ports_are_a_set": (
        _with(POLICY, ports=[443, 443]),
        "spec.ports[1]: Duplicate value: 443",
    ),
    "policy_has_at_most_64_ports": (
        _with(POLICY, ports=list(range(1, 66))),
        "spec.ports: Too many: 65: must have at most 64 items",
    ),
    "policy_allow_entry_is_exact_or_prefix_not_both": (
        _with(POLICY, allow=[{"exact": "spiffe://a/b", "prefix": "spiffe://a/"}]),
        "spec.allow[0]: Too many: 2: must have at most 1 item",
    ),
    "policy_allow_entry_is_not_empty": (
        _with(POLICY, allow=[{}]),
        "spec.allow[0]: Invalid value: 0: spec.allow[0] in body should have at least 1 properties",
    ),
    "policy_allow_exact_is_a_spiffe_id": (
        _with(POLICY, allow=[{"exact": "https://example.org/x"}]),
        "spec.allow[0].exact: Invalid value",
    ),
    "policy_allow_prefix_is_a_spiffe_id": (
        _with(POLICY, allow=[{"prefix": "example.org/"}]),
        "spec.allow[0].prefix: Invalid value",
    ),
    "policy_allows_at_most_256_callers": (
        _with(POLICY, allow=[{"exact": f"spiffe://example.org/{i}"} for i in range(257)]),
        "spec.allow: Too many: 257: must have at most 256 items",
    ),
    "federation_trust_domain_is_lowercase_name": (
        _with(FEDERATION, trustDomain="Partner.Example"),
        "spec.trustDomain: Invalid value",
    ),
    "federation_trust_domain_is_at_most_255_characters": (
        _with(FEDERATION, trustDomain="p" * 256),
        "spec.trustDomain: Too long: may not be more than 255",
    ),
    "federation_bundle_endpoint_is_https": (
        _with(FEDERATION, bundleEndpointURL="http://bundle.partner.example/"),
        "spec.bundleEndpointURL: Invalid value",
    ),
    "federation_bundle_endpoint_id_is_a_spiffe_id": (
        _with(FEDERATION, bundleEndpointSPIFFEID="partner.example/bundle"),
        "spec.bundleEndpointSPIFFEID: Invalid value",
    ),
    "federation_bootstrap_bundle_may_not_be_empty": (
        _with(FEDERATION, bootstrapBundle=""),
        "spec.bootstrapBundle: Invalid value",
    ),
    "federation_needs_a_bootstrap_bundle": (
        _with(FEDERATION, bootstrapBundle=None),
        "spec.bootstrapBundle: Required value",
    ),
}


def _create(installed: Installed, obj: dict[str, Any], dry_run: bool = True) -> Any:
    import kubernetes

    api = kubernetes.client.CustomObjectsApi(installed.plane.api_client())
    plural = {
        "ClusterWorkloadIdentity": "clusterworkloadidentities",
        "AccessPolicy": "accesspolicies",
        "FederatedTrustDomain": "federatedtrustdomains",
    }[obj["kind"]]
    extra = {"dry_run": "All"} if dry_run else {}
    if "namespace" in obj["metadata"]:
        return api.create_namespaced_custom_object(
            GROUP, "v1alpha1", obj["metadata"]["namespace"], plural, obj, **extra
        )
    return api.create_cluster_custom_object(GROUP, "v1alpha1", plural, obj, **extra)


def test_kubectl_apply_k_manifests_server_side_succeeds_and_the_crds_are_established(
    installed: Installed,
) -> None:
    assert installed.apply.returncode == 0, installed.apply.stderr
    for plural in CRDS:
        crd = installed.plane.get("crd", f"{plural}.{GROUP}")
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", (plural, conditions)
        assert conditions.get("NonStructuralSchema") is None, (plural, conditions)
    for kind, name in (
        ("mutatingwebhookconfiguration", "trellis-sidecar-injector"),
        ("validatingwebhookconfiguration", "trellis-validator"),
        ("clusterrole", "trellis-operator"),
        ("deployment", "trellis-operator"),
    ):
        namespace = ("-n", "trellis-system") if kind == "deployment" else ()
        assert installed.plane.get(*namespace, kind, name)["metadata"]["name"] == name


def test_the_examples_are_accepted_by_the_api_server(installed: Installed) -> None:
    for name in ("identities.yaml", "policies.yaml", "federation.yaml"):
        out = installed.plane.kubectl(
            "apply", "--dry-run=server", "-f", str(MANIFESTS / "examples" / name)
        )
        # Namespaced examples name namespaces this cluster lacks: the only refusal allowed.
        refusals = [line for line in out.stderr.splitlines() if 'namespaces "' not in line]
        assert not [line for line in refusals if line.strip()], (name, out.stderr)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_an_object_breaking_a_schema_rule_is_refused_by_the_api_server_with_its_message(
    installed: Installed, rule: str
) -> None:
    import kubernetes

    assert installed.apply.returncode == 0, installed.apply.stderr
    obj, message = RULES[rule]
    with pytest.raises(kubernetes.client.exceptions.ApiException) as refused:
        _create(installed, obj)
    assert refused.value.status == 422, refused.value.body
    body = json.loads(refused.value.body)
    assert message in body["message"], body["message"]


def test_the_withdrawn_early_data_field_is_refused_and_protocol_is_checked(
    installed: Installed,
) -> None:
    """``earlyDataMethods`` was accepted and never read by any data plane; it left the
    schema, so a client asking for strict field validation (kubectl's default) is told it
    does not exist. ``protocol`` is read again (a refused caller of an ``http`` workload
    gets a 403 naming the rule) and takes only the two values the sidecar knows."""
    import kubernetes

    assert installed.apply.returncode == 0, installed.apply.stderr
    api = kubernetes.client.CustomObjectsApi(installed.plane.api_client())

    def create(**fields: Any) -> Any:
        return api.create_namespaced_custom_object(
            GROUP, "v1alpha1", "default", "accesspolicies", _with(POLICY, **fields),
            dry_run="All", field_validation="Strict",
        )  # fmt: skip

    with pytest.raises(kubernetes.client.exceptions.ApiException) as refused:
        create(earlyDataMethods=["GET"])
    assert refused.value.status == 400, refused.value.body
    assert 'unknown field "spec.earlyDataMethods"' in json.loads(refused.value.body)["message"]
    with pytest.raises(kubernetes.client.exceptions.ApiException) as refused:
        create(protocol="grpc")
    assert refused.value.status == 422, refused.value.body
    assert "spec.protocol" in json.loads(refused.value.body)["message"]
    assert create(protocol="http")["spec"]["protocol"] == "http"
    stored = _create(installed, _with(POLICY, mtls=None))
    assert "mtls" not in stored["spec"]  # no default: unset means no opinion, strict


def test_the_valid_base_objects_are_accepted(installed: Installed) -> None:
    """The rule cases differ from these in one field only, so each refusal is that field's."""
    for obj in (CWI, POLICY, FEDERATION):
        created = _create(installed, obj)
        assert created["metadata"]["name"] == "rule-check"


def _workloads() -> list[dict[str, Any]]:
    import yaml

    found = []
    for path in sorted(MANIFESTS.glob("*/*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in ("Deployment", "DaemonSet"):
                found.append(doc)
    return found


@pytest.mark.parametrize(
    "workload", _workloads(), ids=lambda w: f"{w['kind']}/{w['metadata']['name']}"
)
def test_the_pods_of_every_shipped_workload_are_admitted(
    installed: Installed, workload: dict[str, Any]
) -> None:
    """No controller-manager runs here, so the Pod a ReplicaSet or the DaemonSet controller
    would create is created directly (dryRun: validated and admitted in full, never stored):
    Pod Security, priority classes, service accounts and field validation all apply."""
    assert installed.apply.returncode == 0, installed.apply.stderr
    template = workload["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template["metadata"], "name": f"{workload['metadata']['name']}-check"},
        "spec": template["spec"],
    }
    result = installed.plane.kubectl(
        "-n",
        workload["metadata"]["namespace"],
        "create",
        "--dry-run=server",
        "-f",
        "-",
        stdin=json.dumps(pod),
    )
    assert result.returncode == 0, result.stderr
