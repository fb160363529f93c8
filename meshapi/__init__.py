"""The documents the control plane writes and the data plane reads.

The operator (``mesh_operator``) and the sidecar (``sidecar``) never import each other, yet
each document between them has a writer on one side and a reader on the other. Each such
wire format has one owner here, with one parser and one renderer that both sides use, so
the two can only disagree about a document if it fails to round-trip (the tests in
``tests/meshapi`` check that it does):

* ``meshapi.policy`` -- the ``SidecarPolicy`` document (``policy.json`` in the namespace's
  ``trellis-policy`` ConfigMap): ``PolicyDocument``, ``Policy``, ``CallerRule``,
  ``parse_policy_document`` / ``render_policy_document`` and ``parse_caller_rules``.
* ``meshapi.registry`` -- the ``mesh`` section of that document: which destinations are
  in the mesh and the ``outboundTrafficPolicy`` for the rest (``MeshRegistry``).
* ``meshapi.upstreams`` -- the ``trellis.dev/upstreams`` annotation, which the injector
  passes on as the sidecar's ``--upstreams`` flag: ``Upstream``, ``parse_upstreams`` /
  ``render_upstreams``.

Parsers raise ``core.errors.FieldError`` naming the place in the document; each side adds
its own context (the ConfigMap file, the annotation) when it reports one.
"""

from meshapi.policy import (
    API_VERSION,
    KIND,
    CallerRule,
    Policy,
    PolicyDocument,
    parse_caller_rules,
    parse_policy_document,
    render_policy_document,
)
from meshapi.registry import MeshRegistry
from meshapi.upstreams import Upstream, parse_upstreams, render_upstreams

__all__ = [
    "API_VERSION",
    "KIND",
    "CallerRule",
    "MeshRegistry",
    "Policy",
    "PolicyDocument",
    "Upstream",
    "parse_caller_rules",
    "parse_policy_document",
    "parse_upstreams",
    "render_policy_document",
    "render_upstreams",
]
