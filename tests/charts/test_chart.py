"""charts/trellis linted and rendered by the real Helm v4, and what it renders checked.

``helm lint --strict`` and ``helm template`` run on the chart as a user runs them; every
rendered object is validated against the Kubernetes OpenAPI schema of the newest release
``kubernetes-validate`` carries (unknown fields are errors). The site values (trust
domain, cluster, image, namespace) are followed into every field that names them, and
the files the chart shares with manifests/ (CRDs, rules, dashboard) are compared with
their source.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from .conftest import (
    CHART,
    MANIFESTS,
    RELEASE,
    REPO,
    SITE_NAMESPACE,
    SITE_VALUES,
    Render,
    containers,
    key,
    run_helm,
    values_file,
)

K8S_VERSION = kubernetes_validate.utils.latest_version()
FOREIGN_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
REGISTRAR = "node-driver-registrar"  # the one container not running the trellis image
SITE_IMAGE = "registry.corp.example/platform/trellis:2.3.4"


def _site(render: Render) -> list[dict[str, Any]]:
    return render(SITE_VALUES, namespace=SITE_NAMESPACE)


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _args(docs: list[dict[str, Any]], kind: str, name: str, container: str) -> list[str]:
    (found,) = [c for c in containers(_one(docs, kind, name)) if c["name"] == container]
    return list(found.get("args", []))


@pytest.mark.parametrize("values", ["default", "site"])
def test_helm_lint_strict_passes(helm: Path, tmp_path: Path, values: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values == "site":
        args += ["--namespace", SITE_NAMESPACE, "--values", str(values_file(SITE_VALUES, tmp_path))]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
    findings = [line for line in result.stdout.splitlines() if line.startswith("[")]
    # Helm's one remark on any chart without an icon; nothing else.
    assert findings == ["[INFO] Chart.yaml: icon is recommended"], result.stdout


@pytest.mark.parametrize("values", ["default", "site"])
def test_every_rendered_object_validates_against_the_kubernetes_schema(
    render: Render, values: str
) -> None:
    docs = render() if values == "default" else _site(render)
    assert len({key(d) for d in docs}) == len(docs), "an object is rendered twice"
    for doc in docs:
        if doc["kind"] in FOREIGN_KINDS:  # the Prometheus Operator's: no schema here
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert set(doc["spec"]) & {"endpoints", "podMetricsEndpoints", "groups"}
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_site_image_runs_every_trellis_container_and_the_injected_sidecar(
    render: Render,
) -> None:
    docs = _site(render)
    seen = 0
    for doc in docs:
        for container in containers(doc):
            if container["name"] == REGISTRAR:
                continue
            assert container["image"] == SITE_IMAGE, key(doc)
            assert container["imagePullPolicy"] == "Always", key(doc)
            seen += 1
    assert seen == 5  # CA, agent, CSI plugin, operator, CNI installer
    operator = _args(docs, "Deployment", "trellis-operator", "operator")
    assert f"--sidecar-image={SITE_IMAGE}" in operator


def test_the_trust_domain_cluster_and_namespace_reach_every_field_that_names_them(
    render: Render,
) -> None:
    docs = _site(render)
    operator = _args(docs, "Deployment", "trellis-operator", "operator")
    assert "--trust-domain=mesh.corp.example" in operator
    assert "--outbound-traffic-policy=REGISTRY_ONLY" in operator
    ca = _one(docs, "Deployment", "trellis-ca")
    assert ca["spec"]["replicas"] == 3
    ca_args = _args(docs, "Deployment", "trellis-ca", "ca")
    assert "--cluster=eu-west-1" in ca_args
    assert f"--psat-allow={SITE_NAMESPACE}:trellis-agent" in ca_args
    (secret,) = [v for v in ca["spec"]["template"]["spec"]["volumes"] if "secret" in v]
    paths = {item["key"]: item["path"] for item in secret["secret"]["items"]}
    for name in ("intermediate.crt", "intermediate.key", "jwt.key"):
        assert paths[name] == f"clusters/eu-west-1/{name}"
    agent = _args(docs, "DaemonSet", "trellis-agent", "agent")
    assert f"--ca=trellis-ca.{SITE_NAMESPACE}.svc:8081" in agent
    assert f"--ca-attest=trellis-ca.{SITE_NAMESPACE}.svc:8082" in agent

    for doc in docs:
        namespace = doc["metadata"].get("namespace")
        assert namespace in (None, SITE_NAMESPACE), key(doc)
        for subject in doc.get("subjects", []):
            assert subject["namespace"] == SITE_NAMESPACE, key(doc)
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for config in [d for d in docs if d["kind"] == kind]:
            for hook in config["webhooks"]:
                service = hook["clientConfig"]["service"]
                assert (service["name"], service["namespace"]) == (
                    "trellis-operator",
                    SITE_NAMESPACE,
                )

    # Prometheus labels every target with the site's cluster and trust domain, the labels
    # the dashboard's variables and the alerts group by.
    config = _one(docs, "ConfigMap", "trellis-prometheus")["data"]["prometheus.yml"]
    prometheus = yaml.safe_load(config)
    targets = {"cluster": "eu-west-1", "trust_domain": "mesh.corp.example"}
    for job in prometheus["scrape_configs"]:
        labelled = {
            r["target_label"]: r.get("replacement")
            for r in job["relabel_configs"]
            if r.get("target_label") in targets
        }
        assert labelled == targets, job["job_name"]
    for doc in docs:
        if doc["kind"] in ("ServiceMonitor", "PodMonitor"):
            for endpoint in doc["spec"].get("endpoints", doc["spec"].get("podMetricsEndpoints")):
                labelled = {
                    r["targetLabel"]: r.get("replacement")
                    for r in endpoint.get("relabelings", [])
                    if r.get("targetLabel") in targets
                }
                assert labelled == targets, key(doc)

    # Nothing still names the defaults (the dashboard's prose excepted).
    text = yaml.safe_dump_all(
        [d for d in docs if d["metadata"]["name"] != "trellis-grafana-dashboards"]
    )
    for default in ("localhost/trellis", "trellis-system", "example.org", "prod"):
        assert not re.findall(rf"[^\w.-]{re.escape(default)}[^\w.-]", text), default


def test_the_cni_paths_are_the_nodes_own(render: Render) -> None:
    docs = _site(render)
    daemonset = _one(docs, "DaemonSet", "trellis-cni")
    pod = daemonset["spec"]["template"]["spec"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert volumes == {"cni-bin": "/var/lib/cni/bin", "cni-conf": "/var/lib/cni/net.d"}
    (script,) = _args(docs, "DaemonSet", "trellis-cni", "install")
    # The plugin's kubeconfig, as the runtime reads it on the host (not /host/...).
    assert '"kubeconfig": "/var/lib/cni/net.d/trellis-cni.kubeconfig"' in script
    # No host path of the default layout is left outside the container's /host mounts.
    assert not re.findall(r"(?<!/host)/(?:opt/cni/bin|etc/cni/net\.d)", script), script


def test_the_chart_installs_the_crds_of_manifests_unchanged_and_keeps_them(
    render: Render,
) -> None:
    crds = [d for d in render() if d["kind"] == "CustomResourceDefinition"]
    rendered = {d["metadata"]["name"]: d for d in crds}
    sources = [yaml.safe_load(p.read_text()) for p in sorted((MANIFESTS / "crds").glob("*.yaml"))]
    assert set(rendered) == {s["metadata"]["name"] for s in sources}
    for source in sources:
        crd = rendered[source["metadata"]["name"]]
        assert crd["spec"] == source["spec"]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["app.kubernetes.io/part-of"] == "trellis"
    without = render({"crds": {"install": False}})
    assert not [d for d in without if d["kind"] == "CustomResourceDefinition"]


def test_the_rules_scrape_jobs_and_dashboard_are_the_files_of_manifests(render: Render) -> None:
    docs = render({"monitoring": {"prometheusOperator": {"enabled": True}}})
    dashboards = _one(docs, "ConfigMap", "trellis-grafana-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    sources = sorted((MANIFESTS / "grafana").glob("*.json"))
    assert sorted(dashboards["data"]) == [p.name for p in sources]
    for path in sources:
        assert json.loads(dashboards["data"][path.name]) == json.loads(path.read_text())
    prometheus = _one(docs, "ConfigMap", "trellis-prometheus")["data"]
    for name in ("prometheus.yml", "trellis-rules.yml"):
        # With the default values the site rewrite changes nothing: the very same text.
        assert prometheus[name].strip() == (MANIFESTS / "prometheus" / name).read_text().strip()
    from_files = {key(d): d for d in docs if d["kind"] in FOREIGN_KINDS}
    sources_docs = [
        d
        for path in sorted((MANIFESTS / "monitoring").glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    assert set(from_files) == {key(d) for d in sources_docs}
    for source in sources_docs:
        assert from_files[key(source)]["spec"] == source["spec"], key(source)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"trustDomain": "Mesh.Example"}, "at '/trustDomain'"),
        ({"clusterName": "-prod"}, "at '/clusterName'"),
        ({"redirect": {"default": "ebpf"}}, "at '/redirect/default'"),
        ({"operator": {"outboundTrafficPolicy": "DENY"}}, "at '/operator/outboundTrafficPolicy'"),
        ({"operator": {"replica": 3}}, "additional properties 'replica' not allowed"),
        ({"redirect": {"default": "cni"}}, "redirect.default=cni needs cni.enabled=true"),
    ],
)
def test_bad_values_are_refused_with_a_line_naming_the_value(
    helm: Path, tmp_path: Path, values: dict[str, Any], message: str
) -> None:
    result = run_helm(
        helm, "template", RELEASE, str(CHART), "--values", str(values_file(values, tmp_path))
    )
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "goroutine" not in result.stderr and "panic" not in result.stderr


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        present, value = expression["key"] in labels, labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and present and value in expression["values"]:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


@pytest.mark.parametrize(
    ("values", "paths"),
    [
        # label trellis.dev/redirect: none, init, cni -> the path that mutates the pod
        ({}, ("/mutate", "/mutate", "/mutate")),
        ({"cni": {"enabled": True}}, ("/mutate", "/mutate", "/mutate/cni")),
        (
            {"cni": {"enabled": True}, "redirect": {"default": "cni"}},
            ("/mutate/cni", "/mutate", "/mutate/cni"),
        ),
    ],
    ids=["no-cni", "cni-default-init", "cni-default-cni"],
)
def test_each_namespace_is_mutated_by_exactly_one_webhook_in_its_redirect_mode(
    render: Render, values: dict[str, Any], paths: tuple[str, str, str]
) -> None:
    """Without cni.enabled a namespace labelled cni still gets the init container: failing
    closed under Pod Security baseline beats a pod with no redirect and no plugin."""
    (config,) = [d for d in render(values) if d["kind"] == "MutatingWebhookConfiguration"]
    for redirect, path in zip((None, "init", "cni"), paths, strict=True):
        namespace = {"trellis.dev/inject": "enabled", "kubernetes.io/metadata.name": "shop"}
        if redirect:
            namespace["trellis.dev/redirect"] = redirect
        pod: dict[str, str] = {}
        matched = [
            hook["clientConfig"]["service"]["path"]
            for hook in config["webhooks"]
            if _selects(hook["namespaceSelector"], namespace)
            and _selects(hook["objectSelector"], pod)
        ]
        assert matched == [path], (redirect, matched)
        # The system namespaces are never sent, whatever their labels.
        for system in ("kube-system", "trellis-system"):
            labels = {**namespace, "kubernetes.io/metadata.name": system}
            assert not [h for h in config["webhooks"] if _selects(h["namespaceSelector"], labels)]


def test_the_packaged_chart_carries_the_linked_files_and_renders_the_same(
    helm: Path, render: Render, tmp_path: Path
) -> None:
    """files/ links to manifests/ (one source); `helm package` stores the linked contents,
    so a chart archive pushed to a repository needs no checkout beside it."""
    packaged = run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    assert packaged.returncode == 0, packaged.stderr
    (archive,) = tmp_path.glob("trellis-*.tgz")
    result = run_helm(helm, "template", RELEASE, str(archive), "--namespace", "trellis-system")
    assert result.returncode == 0, result.stderr
    from_archive = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    assert from_archive == render()


@pytest.mark.parametrize("mode", ["csi", "hostpath"])
def test_the_socket_volume_value_decides_how_injected_pods_mount_the_workload_api(
    render: Render, tmp_path: Path, mode: str
) -> None:
    """The operator's injection flags, as the chart renders them, given to the real
    `trellis operator inject` (the webhook's own function) with the example pod."""
    docs = render({"agent": {"socketVolume": mode, "socketDir": "/run/site/workload"}})
    args = _args(docs, "Deployment", "trellis-operator", "operator")
    flags = [a for a in args if a.startswith(("--sidecar-image=", "--agent-socket-"))]
    result = subprocess.run(
        [sys.executable, "-m", "trellis", "operator", "inject", "-o", "json", *flags,
         str(MANIFESTS / "examples" / "pod.yaml")],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    volumes = json.loads(result.stdout)["spec"]["volumes"]
    (socket,) = [v for v in volumes if v["name"] == "trellis-workload-api"]
    agent = _one(docs, "DaemonSet", "trellis-agent")["spec"]["template"]["spec"]
    names = [c["name"] for c in agent["containers"]]
    drivers = [d for d in docs if d["kind"] == "CSIDriver"]
    if mode == "csi":
        assert socket["csi"] == {"driver": "csi.trellis.dev", "readOnly": True}
        assert names == ["agent", "csi", REGISTRAR]
        assert [d["metadata"]["name"] for d in drivers] == ["csi.trellis.dev"]
    else:
        assert socket["hostPath"]["path"] == "/run/site/workload"
        assert names == ["agent"]  # no plugin to publish what nothing asks for
        assert not drivers
        assert not [v for v in agent["volumes"] if v["name"].startswith(("csi", "kubelet"))]
    (workload,) = [v for v in agent["volumes"] if v["name"] == "workload-socket"]
    assert workload["hostPath"]["path"] == "/run/site/workload"
