"""Trellis on Kubernetes: CRDs, reconcilers, the sidecar-injection webhook.

Layers (higher import lower, never the reverse):

* values: ``errors``, ``selectors``, ``spec`` (the CRDs as frozen values), ``conditions``;
* sans-I/O cores: ``reconcile`` (CRs + pods → registration entries, sidecar policies,
  statuses), ``bans`` (Node labels → the CA's banned-agents list), ``injection``
  (pod → JSONPatch), ``admission`` (AdmissionReview in → out), ``webhook_certs``
  (serving-certificate plan);
* I/O shells: ``webhook`` (aiohttp HTTPS), ``kube`` (kubernetes client writes),
  ``handlers`` (kopf wiring), ``cli`` (``trellis operator``).
"""

from mesh_operator.bans import BAN_LABEL, ban_list
from mesh_operator.errors import PermanentOperatorError, SpecError, TemporaryOperatorError
from mesh_operator.reconcile import (
    ClusterSnapshot,
    PodView,
    compile_policies,
    entries_document,
    reconcile_federation,
    reconcile_identities,
)
from mesh_operator.spec import (
    API_VERSION,
    GROUP,
    VERSION,
    parse_access_policy,
    parse_federated_trust_domain,
    parse_identity_template,
)

__all__ = [
    "API_VERSION",
    "BAN_LABEL",
    "GROUP",
    "VERSION",
    "ClusterSnapshot",
    "PermanentOperatorError",
    "PodView",
    "SpecError",
    "TemporaryOperatorError",
    "ban_list",
    "compile_policies",
    "entries_document",
    "parse_access_policy",
    "parse_federated_trust_domain",
    "parse_identity_template",
    "reconcile_federation",
    "reconcile_identities",
]
