"""A small, strict Python rendering of the kustomizations under ``manifests/``.

It implements exactly the features those kustomizations use (``resources`` as files or
directories, ``configMapGenerator`` with ``files`` and ``options``, ``generatorOptions``,
``labels`` without selectors, ``namespace``) and refuses any other key, so it cannot drift
silently from what ``kubectl kustomize`` would do. The tests compare the two whenever a
kubectl with kustomize v4+ is on the PATH (Debian's kubectl 1.20 bundles kustomize v2,
too old for these files), and rely on this rendering otherwise.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KNOWN_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "labels",
    "namespace",
}
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "ClusterWorkloadIdentity",
    "FederatedTrustDomain",
}


class KustomizeError(Exception):
    pass


def _load_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{directory}: unsupported kustomization keys {sorted(unknown)}")
    documents: list[dict[str, Any]] = []
    for resource in kustomization.get("resources") or []:
        target = (directory / resource).resolve()
        if target.is_dir():
            documents.extend(render(target))
        elif target.is_file():
            if not target.is_relative_to(directory.resolve()):
                raise KustomizeError(f"{resource}: files must be inside the kustomization root")
            documents.extend(_load_documents(target))
        else:
            raise KustomizeError(f"{directory}: resource {resource} does not exist")
    options = kustomization.get("generatorOptions") or {}
    for generator in kustomization.get("configMapGenerator") or []:
        extra = set(generator) - {"name", "namespace", "files", "options"}
        if extra:
            raise KustomizeError(f"configMapGenerator: unsupported keys {sorted(extra)}")
        merged = {**options, **(generator.get("options") or {})}
        if not merged.get("disableNameSuffixHash"):
            raise KustomizeError("generated names must not carry a hash suffix (stable refs)")
        data = {}
        for entry in generator.get("files") or []:
            key, _, source = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            data[key] = (directory / source).read_text()
        metadata: dict[str, Any] = {"name": generator["name"]}
        if generator.get("namespace"):
            metadata["namespace"] = generator["namespace"]
        if merged.get("labels"):
            metadata["labels"] = dict(merged["labels"])
        documents.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
        )
    for label_set in kustomization.get("labels") or []:
        if label_set.get("includeSelectors"):
            raise KustomizeError("labels with includeSelectors are not supported here")
        for doc in documents:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])
    namespace = kustomization.get("namespace")
    if namespace:
        for doc in documents:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
    return copy.deepcopy(documents)


def key(doc: dict[str, Any]) -> tuple[str, str, str]:
    meta = doc.get("metadata") or {}
    return (doc["kind"], meta.get("namespace") or "", meta["name"])
