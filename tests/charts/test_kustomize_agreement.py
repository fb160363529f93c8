"""The chart and kustomize's manifests/ install the same mesh, so neither drifts silently.

The chart's templates restate manifests/ with values in place of the fixed names; these
tests render both (kustomize by ``tests/manifests/kustomize.py``, Helm for real) and
compare them: the same objects (kind, namespace, name), the same images in the same
containers, and each shared object equal field by field once Helm's own labels and
annotations are set aside. Every intended difference is listed here with its reason, so a
change to one side only is a failure that names the object.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.manifests import kustomize

from .conftest import MANIFESTS, Render, containers, key

# Everything the chart can render that kustomize also ships: the CNI DaemonSet and the
# Prometheus Operator's objects are values (off by default) in the chart.
ALL_ON: dict[str, Any] = {
    "cni": {"enabled": True},
    "monitoring": {"prometheusOperator": {"enabled": True}},
}
# kustomize ships the namespace; a Helm release installs into one (--create-namespace),
# as Helm's own documentation advises, so uninstalling never deletes the namespace.
ONLY_KUSTOMIZE = {("Namespace", "", "trellis-system")}
# Operator flags the chart states explicitly (each at the operator's own default), so
# their values are visible and settable.
CHART_ONLY_OPERATOR_ARGS = {
    "--agent-socket-volume=csi",
    "--agent-socket-dir=/run/trellis/workload",
    "--outbound-traffic-policy=ALLOW_ANY",
    "--log-level=info",
}
HELM_LABELS = {
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "helm.sh/chart",
}


def _kustomized() -> dict[tuple[str, str, str], dict[str, Any]]:
    docs = kustomize.render(MANIFESTS) + kustomize.render(MANIFESTS / "monitoring")
    return {key(d): d for d in docs}


def _charted(render: Render, values: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {key(d): d for d in render(values)}


def _images(doc: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["image"] for c in containers(doc)}


def _without_helm_metadata(doc: dict[str, Any]) -> dict[str, Any]:
    """The object as kustomize would write it: Helm's labels, the CRDs' keep annotation
    and the explicit operator flags set aside."""
    doc = copy.deepcopy(doc)
    holders = [doc["metadata"]]
    if doc["kind"] in ("Deployment", "DaemonSet"):
        holders.append(doc["spec"]["template"]["metadata"])
    for metadata in holders:
        labels = metadata.get("labels") or {}
        for name in HELM_LABELS:
            labels.pop(name, None)
        annotations = metadata.get("annotations") or {}
        annotations.pop("helm.sh/resource-policy", None)
        if "annotations" in metadata and not annotations:
            del metadata["annotations"]
    for container in containers(doc):
        if container["name"] == "operator":
            container["args"] = [a for a in container["args"] if a not in CHART_ONLY_OPERATOR_ARGS]
    return doc


def _differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where two decoded objects differ, as paths with both values (for the failure)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        found = []
        for name in sorted(set(ours) | set(theirs)):
            found += _differences(ours.get(name), theirs.get(name), f"{path}.{name}")
        return found
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [
            d
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
            for d in _differences(a, b, f"{path}[{i}]")
        ]
    return [] if ours == theirs else [f"{path}: chart {ours!r} != kustomize {theirs!r}"]


def test_the_chart_with_every_part_on_renders_the_objects_kustomize_renders(
    render: Render,
) -> None:
    charted = set(_charted(render, ALL_ON))
    kustomized = set(_kustomized())
    assert sorted(kustomized - charted) == sorted(ONLY_KUSTOMIZE)
    assert sorted(charted - kustomized) == []


def test_the_chart_with_default_values_renders_a_subset_of_kustomize(render: Render) -> None:
    defaults = set(_charted(render, {}))
    assert not defaults - set(_kustomized())
    # Off by default: the CNI mode and the Prometheus Operator's objects.
    left_out = {k for k in set(_kustomized()) - defaults if k not in ONLY_KUSTOMIZE}
    assert {kind for kind, _, _ in left_out} <= {
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    }
    assert {name for kind, _, name in left_out if kind == "DaemonSet"} == {"trellis-cni"}


def test_the_chart_with_default_values_and_kustomize_run_the_same_images(
    render: Render,
) -> None:
    charted = _charted(render, {})
    kustomized = _kustomized()
    compared = 0
    for object_key in set(charted) & set(kustomized):
        assert _images(charted[object_key]) == _images(kustomized[object_key]), object_key
        compared += len(_images(charted[object_key]))
    assert compared == 5  # CA; agent, CSI plugin, registrar; operator
    operator = next(
        c for c in containers(charted[("Deployment", "trellis-system", "trellis-operator")])
    )
    kustomized_operator = containers(
        kustomized[("Deployment", "trellis-system", "trellis-operator")]
    )[0]
    sidecar = [a for a in operator["args"] if a.startswith("--sidecar-image=")]
    assert sidecar == [a for a in kustomized_operator["args"] if a.startswith("--sidecar-image=")]


def test_every_object_both_render_is_the_same_but_for_helms_labels(render: Render) -> None:
    charted = _charted(render, ALL_ON)
    kustomized = _kustomized()
    shared = sorted(set(charted) & set(kustomized))
    assert len(shared) >= 30
    for object_key in shared:
        differences = _differences(
            _without_helm_metadata(charted[object_key]), kustomized[object_key]
        )
        assert not differences, (object_key, differences)
