"""Shared helpers: a webhook PKI on disk and AdmissionReviews as the API server sends them."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mesh_operator.webhook import CertificateFiles
from mesh_operator.webhook_certs import WebhookPki, plan_rotation, service_dns_names

T = TypeVar("T")
WEBHOOK_HOST = "trellis-operator.trellis-system.svc"

POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "generateName": "ledger-7c9f5d-",
        "namespace": "payments",
        "labels": {"app": "ledger", "pod-template-hash": "7c9f5d"},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "ledger-7c9f5d",
                "uid": "3c1e7a7e-5a0e-4a43-9d38-0a3c6f1d2b11",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    },
    "spec": {
        "serviceAccountName": "ledger",
        "containers": [
            {
                "name": "app",
                "image": "registry.example/ledger:1.4",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
                "volumeMounts": [
                    {
                        "name": "kube-api-access-x7k2p",
                        "readOnly": True,
                        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    }
                ],
            }
        ],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0,
        "volumes": [
            {
                "name": "kube-api-access-x7k2p",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                    ],
                    "defaultMode": 420,
                },
            }
        ],
    },
    "status": {},
}


def pod(**changes: Any) -> dict[str, Any]:
    """A copy of POD; ``annotations=...``, ``spec={...}`` merge into it."""
    result = copy.deepcopy(POD)
    if "annotations" in changes:
        result["metadata"]["annotations"] = changes.pop("annotations")
    result["spec"].update(changes.pop("spec", {}))
    assert not changes
    return result


def admission_review(
    obj: Any,
    *,
    kind: str = "Pod",
    group: str = "",
    version: str = "v1",
    resource: str = "pods",
    operation: str = "CREATE",
) -> dict[str, Any]:
    """An AdmissionReview v1 the way kube-apiserver 1.3x posts it."""
    return {
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "requestResource": {"group": group, "version": version, "resource": resource},
            "namespace": "payments" if kind != "ClusterWorkloadIdentity" else None,
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "6a2b1c4e-1111-4222-8333-944455556666",
                "groups": [
                    "system:serviceaccounts",
                    "system:serviceaccounts:kube-system",
                    "system:authenticated",
                ],
            },
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def write_pki(directory: Path, pki: WebhookPki) -> CertificateFiles:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(pki.tls_crt)
    (directory / "tls.key").write_bytes(pki.tls_key)
    (directory / "ca.crt").write_bytes(pki.ca_bundle)
    return CertificateFiles(directory / "tls.crt", directory / "tls.key")


@pytest.fixture(scope="session")
def webhook_pki() -> WebhookPki:
    now = dt.datetime.now(dt.UTC)
    return plan_rotation(
        None, dns_names=service_dns_names("trellis-operator", "trellis-system"), now=now
    ).pki
