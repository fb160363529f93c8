"""Every manifest under manifests/: Kubernetes schemas, structural CRDs, example CRs,
kustomize rendering, Prometheus rules and scrape config, the dashboard's metric names, and
how the CA and agent pods are wired: operator-kept ConfigMaps, probes.

``kubernetes-validate`` carries the OpenAPI schemas of Kubernetes releases; the newest one
it ships is used, strictly (unknown fields are errors). Kinds that are not Kubernetes' own
(our CRDs' objects, the Prometheus Operator's ServiceMonitor/PodMonitor/PrometheusRule)
have no schema there: ours are validated against our CRDs with ``jsonschema``, the
Prometheus Operator's by their essential fields plus ``promtool`` for the rules.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, cast

import jsonschema
import kubernetes_validate
import pytest
import yaml
from aiohttp import web

from ca.agent.admin import AdminServer
from ca.agent.metrics import AgentMetrics
from ca.agent.rotator import Rotator
from ca.server.app import CaServer
from ca.server.bans import parse_ban_list
from ca.server.metrics import CaMetrics
from mesh_operator.bans import BAN_LIST_KEY, ban_list
from mesh_operator.handlers import ENTRIES_KEY, OperatorConfig
from mesh_operator.metrics import WebhookMetrics
from mesh_operator.spec import (
    parse_access_policy,
    parse_federated_trust_domain,
    parse_identity_template,
)
from sidecar.metrics import Metrics as SidecarMetrics

from . import kustomize

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
K8S_VERSION = kubernetes_validate.utils.latest_version()
FOREIGN_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
# The sidecar's TLS metrics (a public contract of the dashboards and alerts).
SIDECAR_TLS_METRICS = {
    "tls_handshake_duration_seconds",
    "tls_resumption_total",
    "tls_version_total",
    "tls_cipher_suite_total",
    "tls_group_total",
    "tls_early_data_total",
    "tls_ocsp_staple_total",
}


def rendered() -> list[dict[str, Any]]:
    return kustomize.render(MANIFESTS) + kustomize.render(MANIFESTS / "monitoring")


def crds() -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted((MANIFESTS / "crds").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        found[doc["spec"]["names"]["kind"]] = doc
    return found


def test_the_newest_kubernetes_schema_is_a_current_release() -> None:
    major, minor = (int(p) for p in K8S_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 33), "native sidecars (restartPolicy Always) are GA in 1.33"


@pytest.mark.parametrize("doc", rendered(), ids=lambda d: "/".join(kustomize.key(d)))
def test_every_rendered_manifest_validates(doc: dict[str, Any]) -> None:
    if doc["kind"] in FOREIGN_KINDS:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(doc["spec"]) & {"endpoints", "podMetricsEndpoints", "groups"}
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomize_renders_every_file_once_and_matches_kubectl_when_available() -> None:
    ours = rendered()
    keys = [kustomize.key(d) for d in ours]
    assert len(keys) == len(set(keys))
    listed = {p.relative_to(MANIFESTS).as_posix() for p in MANIFESTS.rglob("*.yaml")}
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    used = set(kustomization["resources"])
    used |= {f for g in kustomization.get("configMapGenerator", []) for f in g["files"]}
    used |= {f"monitoring/{r}" for r in ("servicemonitor.yaml", "prometheusrule.yaml")}
    leftovers = {p for p in listed - used if not p.startswith("examples/")}
    assert leftovers <= {
        "kustomization.yaml",
        "monitoring/kustomization.yaml",
        "grafana/kustomization.yaml",
    }
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return
    version = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, check=False
    )
    kustomize_version = json.loads(version.stdout or "{}").get("kustomizeVersion", "v2")
    if not re.match(r"v[4-9]|v\d\d", kustomize_version):
        return  # Debian's kubectl 1.20 (kustomize v2) cannot read these files
    for directory in (MANIFESTS, MANIFESTS / "monitoring"):
        output = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        theirs = {kustomize.key(d): d for d in yaml.safe_load_all(output)}
        mine = {kustomize.key(d): d for d in kustomize.render(directory)}
        assert mine == theirs


# --- CRDs -------------------------------------------------------------------------------

_META_ALLOWED = {"name", "generateName"}


def structural_problems(schema: dict[str, Any], path: str, root: bool = False) -> list[str]:
    """The rules of a structural schema (Kubernetes docs, "Specifying a structural schema")."""
    problems = []
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    int_or_string = schema.get("x-kubernetes-int-or-string") is True
    if "type" not in schema and not (preserve or int_or_string):
        problems.append(f"{path}: no type")
    if "$ref" in schema:
        problems.append(f"{path}: $ref is not allowed")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: properties and additionalProperties together")
    for combinator in ("allOf", "anyOf", "oneOf", "not"):
        branches = schema.get(combinator) or []
        for branch in [branches] if isinstance(branches, dict) else branches:
            for forbidden in ("type", "default", "description", "additionalProperties", "nullable"):
                if forbidden in branch:
                    problems.append(f"{path}.{combinator}: {forbidden} inside a combinator")
    for name, sub in (schema.get("properties") or {}).items():
        if root and name == "metadata":
            extra = (
                set(sub) - {"type", "properties"}
                or set(sub.get("properties") or {}) - _META_ALLOWED
            )
            if extra:
                problems.append(f"{path}.metadata: only name/generateName may be restricted")
            continue
        problems.extend(structural_problems(sub, f"{path}.{name}"))
    if isinstance(schema.get("additionalProperties"), dict):
        problems.extend(structural_problems(schema["additionalProperties"], f"{path}.*"))
    if "items" in schema:
        problems.extend(structural_problems(schema["items"], f"{path}[]"))
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            required = set(schema["items"].get("required") or [])
            if not keys or not set(keys) <= required:
                problems.append(f"{path}: list-map keys must be required item fields")
    if "default" in schema:
        try:
            jsonschema.validate(schema["default"], _strict(schema))
        except jsonschema.ValidationError as exc:
            problems.append(f"{path}: default does not validate: {exc.message}")
    return problems


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused (the API server would silently prune them)."""
    schema = copy.deepcopy(schema)

    def walk(node: dict[str, Any]) -> None:
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for sub in (node.get("properties") or {}).values():
            walk(sub)
        if isinstance(node.get("items"), dict):
            walk(node["items"])

    walk(schema)
    return schema


@pytest.mark.parametrize("kind", sorted(crds()))
def test_every_crd_schema_is_structural_with_status_and_printer_columns(kind: str) -> None:
    crd = crds()[kind]
    (version,) = crd["spec"]["versions"]
    assert version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Ready", "Age"} <= columns
    schema = version["schema"]["openAPIV3Schema"]
    assert structural_problems(schema, kind, root=True) == []
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


PARSERS = {
    "ClusterWorkloadIdentity": parse_identity_template,
    "AccessPolicy": parse_access_policy,
    "FederatedTrustDomain": parse_federated_trust_domain,
}


def example_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((MANIFESTS / "examples").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


@pytest.mark.parametrize(
    "doc", example_documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_example_resources_validate_against_their_crd_and_the_operator(doc: dict[str, Any]) -> None:
    if doc["kind"] == "Pod":
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    crd = crds()[doc["kind"]]
    (version,) = crd["spec"]["versions"]
    assert doc["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    jsonschema.validate(doc, _strict(version["schema"]["openAPIV3Schema"]))
    if crd["spec"]["scope"] == "Namespaced":
        doc = {**doc, "metadata": {**doc["metadata"]}}
    PARSERS[doc["kind"]](doc)


def test_a_schema_violation_in_an_example_is_caught() -> None:
    schema = _strict(crds()["AccessPolicy"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    bad = {
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "AccessPolicy",
        "metadata": {"name": "x"},
        "spec": {"protocol": "quic", "alow": []},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# --- Prometheus -------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool missing: apt-get install --no-install-recommends prometheus")
    return found


def test_alert_rules_pass_promtool_and_the_prometheusrule_mirrors_them(tmp_path: Path) -> None:
    rules_file = MANIFESTS / "prometheus" / "trellis-rules.yml"
    subprocess.run(
        [promtool(), "check", "rules", str(rules_file)], check=True, capture_output=True, timeout=60
    )
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    rule = yaml.safe_load((MANIFESTS / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == groups
    alerts = {r["alert"] for g in groups for r in g["rules"]}
    assert {
        "TrellisCAIssuanceErrors",
        "TrellisCAAuthorityExpiresSoon",
        "TrellisSVIDsCloseToExpiry",
        "TrellisAgentSVIDCloseToExpiry",
        "TrellisAgentFetchErrors",
        "TrellisFederatedBundleStale",
        "TrellisCADown",
        "TrellisOperatorDown",
        "TrellisWebhookDown",
        "TrellisWebhookCertificateExpiresSoon",
        "TrellisSidecarSVIDCloseToExpiry",
        "TrellisPolicyDenialSpike",
        "TrellisHandshakeFailures",
        "TrellisResumptionRatioDrop",
    } <= alerts


def test_the_scrape_config_passes_promtool_with_static_targets(tmp_path: Path) -> None:
    """Debian's Prometheus is built without Kubernetes service discovery, so promtool there
    rejects ``kubernetes_sd_configs``; the test swaps each for a static target and checks
    everything else (relabelling, rule files) with promtool."""
    config = yaml.safe_load((MANIFESTS / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"trellis-ca", "trellis-operator", "trellis-agent", "trellis-sidecar"}
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
        for relabel in job["relabel_configs"]:
            re.compile(relabel.get("regex", ".*"))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(MANIFESTS / "prometheus" / "trellis-rules.yml", tmp_path / "trellis-rules.yml")
    subprocess.run(
        [promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
        check=True,
        capture_output=True,
        timeout=60,
    )


# --- Grafana ----------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    names = set(SIDECAR_TLS_METRICS)
    ca = CaMetrics("example.org", "c")
    ca.x509_issued(0.001)
    ca.jwt_issued(0.001)
    ca.rejected("r")
    ca.authority_expiry("intermediate", 1.0)
    ca.attested_agents(1)
    ca.signing_stream_opened()
    ca.entries(1)
    ca.entry_reload_failed()
    ca.federation_fetch("partner.org", "ok")
    # The sidecar's own registry too: its trellis_sidecar_* names (sidecar/__init__.py).
    registries = (ca.registry, AgentMetrics().registry, SidecarMetrics().registry)
    for registry in (*registries, WebhookMetrics().registry):
        for family in registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    names.update(f"tls_handshake_duration_seconds_{s}" for s in ("bucket", "sum", "count"))
    return names


def dashboard() -> dict[str, Any]:
    return json.loads((MANIFESTS / "grafana" / "trellis-mesh.json").read_text())


def panel_queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_the_dashboard_uses_only_the_metric_names_of_the_contract() -> None:
    known = exported_metric_names()
    used = set()
    for title, expr in panel_queries():
        for name in re.findall(r"\b((?:trellis|tls)_[a-z0-9_]+)\b", expr):
            assert name in known, f"panel {title!r} uses unknown metric {name}"
            used.add(name)
    for metric in (
        "trellis_ca_x509_svid_issued_total",
        "trellis_ca_sign_duration_seconds_bucket",
        "trellis_ca_requests_rejected_total",
        "trellis_ca_authority_expiry_timestamp_seconds",
        "trellis_agent_svid_rotations_total",
        "trellis_agent_svid_cache_size",
        "trellis_agent_svid_nearest_expiry_seconds",
        "trellis_agent_upstream_fetch_errors_total",
        "trellis_agent_upstream_refusals_total",
        "trellis_ca_federation_fetch_total",
        "trellis_ca_federation_last_success_timestamp_seconds",
        "trellis_sidecar_policy_decisions_total",
        "trellis_sidecar_tls_handshake_failures_total",
        "trellis_sidecar_svid_expiry_timestamp_seconds",
        "trellis_operator_webhook_certificate_expiry_timestamp_seconds",
    ):
        assert metric in used


def test_the_dashboard_imports_with_a_datasource_variable_and_unique_panel_ids() -> None:
    dash = dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # Grafana pushes an overlapping panel down on import, silently reordering the layout.
    boxes = [(p["title"], p["gridPos"]) for p in dash["panels"]]
    for index, (title, a) in enumerate(boxes):
        assert a["x"] >= 0 and a["x"] + a["w"] <= 24, title
        for other, b in boxes[index + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"panels {title!r} and {other!r} overlap"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
    titles = {p["title"] for p in dash["panels"]}
    for wanted in (
        "X509-SVID issuance rate by trust domain and cluster",
        "Issuance latency p99",
        "Rejections by reason",
        "SVID expiry horizon",
        "SVID rotations",
        "Cached SVIDs and upstream health",
        "Upstream fetch errors",
        "Upstream refusals",
        "Federation fetch outcomes",
        "Federated bundle age",
        "Handshake duration p95",
        "Share of X25519MLKEM768 handshakes",
        "Cipher suites",
        "TLS versions",
        "Resumption ratio",
        "Early data by outcome",
    ):
        assert wanted in titles


def test_the_structural_check_catches_what_the_api_server_would_refuse() -> None:
    bad = {
        "type": "object",
        "properties": {
            "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}},
            "spec": {
                "type": "object",
                "properties": {"untyped": {"description": "no type"}},
                "additionalProperties": {"type": "string"},
                "anyOf": [{"type": "object"}],
            },
            "status": {"type": "string", "default": 3},
        },
    }
    problems = "\n".join(structural_problems(bad, "X", root=True))
    for words in (
        "only name/generateName",
        "untyped: no type",
        "properties and additionalProperties",
        "type inside a combinator",
        "default does not validate",
    ):
        assert words in problems


# --- the CA and the agent -----------------------------------------------------------------


def workload(kind: str, name: str) -> dict[str, Any]:
    """The pod spec of a rendered Deployment or DaemonSet."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered()}
    pod: dict[str, Any] = docs[(kind, name)]["spec"]["template"]["spec"]
    return pod


def probe_budget(probe: dict[str, Any]) -> int:
    """Seconds of failures before the kubelet acts (Kubernetes' defaults: 10 s, 3 times)."""
    return int(probe.get("periodSeconds", 10)) * int(probe.get("failureThreshold", 3))


def served_paths(app: web.Application) -> set[str]:
    return {resource.canonical for resource in app.router.resources()}


# ConfigMap the operator keeps -> (its key, the CA flag that reads the mounted file).
OPERATOR_CONFIG_MAPS = {
    OperatorConfig.entries_config_map: (ENTRIES_KEY, "--entries"),
    OperatorConfig.federation_config_map: ("federation.json", "--federation"),
    OperatorConfig.banned_agents_config_map: (BAN_LIST_KEY, "--banned-agents"),
}


def test_the_manifests_ship_none_of_the_configmaps_the_operator_keeps() -> None:
    # `kubectl apply -k` would put the shipped copy back over the operator's until its
    # next sync: for the ban list, lifting every ban meanwhile.
    shipped = {d["metadata"]["name"] for d in rendered() if d["kind"] == "ConfigMap"}
    assert "trellis-prometheus" in shipped
    assert not shipped & set(OPERATOR_CONFIG_MAPS)


def test_the_ca_waits_for_the_operator_configmaps_and_reads_each_where_its_flag_says() -> None:
    pod = workload("Deployment", "trellis-ca")
    (ca,) = pod["containers"]
    mounts = {m["name"]: m for m in ca["volumeMounts"]}
    flags = dict(a.split("=", 1) for a in ca["args"] if a.startswith("--") and "=" in a)
    for name, (key, flag) in OPERATOR_CONFIG_MAPS.items():
        (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == name]
        # Not optional: the pod waits for the operator to write it. The CA refuses to start
        # without its --banned-agents file, and an empty mount would only crash-loop it.
        assert volume["configMap"] == {"name": name}, name
        mount = mounts[volume["name"]]
        assert mount["readOnly"] is True
        assert flags[flag] == f"{mount['mountPath']}/{key}"


def test_the_ban_list_the_operator_writes_is_one_the_ca_parses() -> None:
    assert parse_ban_list(ban_list({}).text()) == frozenset()
    labels = {"worker-1": "true", "123": "true", "null": "yes", "node-b": "false"}
    assert parse_ban_list(ban_list(labels).text()) == {"worker-1", "123", "null"}


def test_the_ca_probes_ask_for_paths_it_serves() -> None:
    (ca,) = workload("Deployment", "trellis-ca")["containers"]
    ports = {p["name"] for p in ca["ports"]}
    assert ca["readinessProbe"] == {"tcpSocket": {"port": "grpc"}, "periodSeconds": 5}
    liveness = ca["livenessProbe"]["httpGet"]
    assert liveness["port"] in ports
    # /healthz answers while the process does; the metrics app needs no server to build.
    assert liveness["path"] == "/healthz"
    assert liveness["path"] in served_paths(CaServer._metrics_app(cast(CaServer, None)))


def test_the_agent_is_ready_after_its_first_sync_and_live_unless_wedged_once_started() -> None:
    containers = workload("DaemonSet", "trellis-agent")["containers"]
    (agent,) = [c for c in containers if c["name"] == "agent"]  # beside: the CSI plugin's
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    (admin,) = [a for a in agent["args"] if a.startswith("--admin=")]
    assert admin.rpartition(":")[2] == str(ports["metrics"])
    served = served_paths(AdminServer(cast(Rotator, None)).app())
    readiness, startup, liveness = (
        agent[k] for k in ("readinessProbe", "startupProbe", "livenessProbe")
    )
    for probe in (readiness, startup, liveness):
        assert probe["httpGet"]["port"] == "metrics"
        assert probe["httpGet"]["path"] in served
    assert readiness["httpGet"]["path"] == "/readyz"
    # /healthz is 503 "starting" until the first sync, so liveness on it must wait for
    # start-up (the first sync: /readyz), and an agent whose CA is not there yet gets minutes
    # of retries, not one liveness budget, before a restart that cannot bring the CA back.
    assert startup["httpGet"]["path"] == "/readyz"
    assert probe_budget(startup) >= 180 > probe_budget(liveness)
    # After start-up, liveness fails only when a restart helps (the agent's own SVID has
    # expired), not with the CA unreachable or entries without SVIDs (/healthz 503).
    assert liveness["httpGet"]["path"] == "/livez"
