"""TokenReview through the official ``kubernetes`` client (the I/O half of PSAT attestation).

The client is synchronous (urllib3), so each review runs in a worker thread. Configuration
comes from a kubeconfig file, or from the in-cluster service account when none is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import urllib3

from ca.server.attestation import TokenReviewResult

__all__ = ["KubernetesTokenReviewer"]


class KubernetesTokenReviewer:
    def __init__(self, api_client: Any) -> None:
        from kubernetes import client  # type: ignore[import-not-found, unused-ignore]

        self._api = client.AuthenticationV1Api(api_client)
        self._client = client

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path | None) -> KubernetesTokenReviewer:
        """From ``kubeconfig``, or the in-cluster config (service-account token) if None."""
        from kubernetes import (  # type: ignore[import-not-found, unused-ignore]
            client,
            config,
        )

        if kubeconfig is None:
            config.load_incluster_config()  # type: ignore[no-untyped-call, unused-ignore]
            return cls(client.ApiClient())
        configuration = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call, unused-ignore]
            config_file=str(kubeconfig), client_configuration=configuration
        )
        return cls(client.ApiClient(configuration))

    def _review_sync(self, token: str, audiences: Sequence[str]) -> TokenReviewResult:
        from kubernetes.client.exceptions import (  # type: ignore[import-not-found, unused-ignore]
            ApiException,
        )

        # apiVersion/kind are set explicitly: the generated client omits them otherwise,
        # and the API server's decoder may insist on them ("Object 'Kind' is missing").
        body = self._client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=self._client.V1TokenReviewSpec(token=token, audiences=list(audiences)),
        )
        try:
            response = self._api.create_token_review(body)
        except ApiException as exc:
            # 401/403 mean *our* credentials are wrong, not the agent's: that is an outage.
            raise OSError(f"TokenReview API answered {exc.status} {exc.reason}") from exc
        except urllib3.exceptions.HTTPError as exc:  # connection refused, TLS, timeouts
            raise OSError(f"TokenReview request failed: {type(exc).__name__}: {exc}") from exc
        status = response.status
        if status is None:
            return TokenReviewResult(authenticated=False, error="empty TokenReview status")
        user = status.user
        return TokenReviewResult.from_status(
            {
                "authenticated": status.authenticated,
                "audiences": status.audiences or [],
                "error": status.error or "",
                "user": {
                    "username": getattr(user, "username", "") or "",
                    "extra": getattr(user, "extra", None) or {},
                },
            }
        )

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReviewResult:
        return await asyncio.to_thread(self._review_sync, token, audiences)
