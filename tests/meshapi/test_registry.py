"""The ``mesh`` section of the SidecarPolicy document: what the operator renders, the
sidecar reads back to the same value; a bad section is refused naming its JSON path."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from core.errors import FieldError
from meshapi.policy import PolicyDocument, parse_policy_document, render_policy_document
from meshapi.registry import MeshRegistry

CANONICAL: dict[str, Any] = {
    "apiVersion": "trellis.dev/v1alpha1",
    "kind": "SidecarPolicy",
    "policies": [],
    "mesh": {
        "outboundTrafficPolicy": "REGISTRY_ONLY",
        "destinations": ["10.96.0.10/32", "10.244.0.0/24", "fd00::7/128"],
    },
}


def test_the_canonical_mesh_section_round_trips_unchanged() -> None:
    assert render_policy_document(parse_policy_document(CANONICAL)) == CANONICAL


def test_a_document_without_a_mesh_section_renders_without_one() -> None:
    document = parse_policy_document({"policies": []})
    assert document.mesh is None
    assert "mesh" not in render_policy_document(document)


def test_destinations_are_canonical_whatever_order_and_repetition_they_came_in() -> None:
    raw = {"destinations": ["fd00::7/128", "10.244.0.0/24", "10.96.0.10", "10.96.0.10/32"]}
    document = parse_policy_document({"mesh": raw})
    assert document.mesh == MeshRegistry(
        (ipaddress.ip_network("10.96.0.10/32"), ipaddress.ip_network("10.244.0.0/24"),
         ipaddress.ip_network("fd00::7/128")),
        "ALLOW_ANY",
    )  # fmt: skip
    assert parse_policy_document(render_policy_document(document)) == document


def test_membership_is_by_network_and_sees_through_ipv4_mapped_addresses() -> None:
    registry = MeshRegistry((ipaddress.ip_network("10.244.0.0/24"),))
    assert registry.contains("10.244.0.9")
    assert registry.contains("::ffff:10.244.0.9")
    assert not registry.contains("10.244.1.9")
    assert not registry.contains("not-an-address")
    assert PolicyDocument().mesh is None


@pytest.mark.parametrize(
    ("mesh", "field"),
    [
        ({"outboundTrafficPolicy": "DENY"}, "policy.mesh.outboundTrafficPolicy"),
        ({"destinations": "10.0.0.0/8"}, "policy.mesh.destinations"),
        ({"destinations": ["10.0.0.1/8"]}, "policy.mesh.destinations[0]"),
        ({"destinations": ["10.0.0.0/33"]}, "policy.mesh.destinations[0]"),
        ({"destinations": [8]}, "policy.mesh.destinations[0]"),
        ([], "policy.mesh"),
    ],
)
def test_a_malformed_mesh_section_is_refused_naming_its_path(mesh: Any, field: str) -> None:
    with pytest.raises(FieldError) as caught:
        parse_policy_document({"mesh": mesh})
    assert caught.value.field == field
