"""The one Kubernetes label grammar (Kubernetes' IsQualifiedName / IsValidLabelValue),
and that every place which reads a label uses it: the CA's pod-label selectors, the
operator's CRD selectors and the sidecar's policy document agree on each case."""

from __future__ import annotations

import pytest

from ca.entries import EntryError, parse_selector
from core.errors import FieldError
from core.labels import LabelSelector, is_label_key, is_label_value
from mesh_operator.errors import SpecError
from sidecar.policy import PolicyError, authorizer_from_document

GOOD_KEYS = [
    "app",
    "app.kubernetes.io/name",
    "a/b",
    "x" * 63,
    f"{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 61}/name",  # a 253-character prefix
    "A_b-c.D",
]
BAD_KEYS = [
    "",
    "-app",
    "app-",
    "x" * 64,
    "/name",
    "Example.com/name",  # prefixes are lowercase DNS subdomains
    "a..b/name",  # an empty DNS label
    "a./name",
    "-a/name",
    f"{'a' * 63}.{'b' * 63}.{'c' * 63}.{'d' * 62}/name",  # a 254-character prefix
    "a/b/c",
    "app name",
    "äpp",
]
GOOD_VALUES = ["", "web", "v1.2_3-x", "x" * 63]
BAD_VALUES = ["-web", "web-", "x" * 64, "a b", "a/b"]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_a_valid_label_key_is_accepted_by_every_reader(key: str) -> None:
    assert is_label_key(key)
    parse_selector(f"k8s:pod-label:{key}:web")
    LabelSelector.parse({"matchLabels": {key: "web"}}, "spec.selector")


@pytest.mark.parametrize("key", BAD_KEYS)
def test_an_invalid_label_key_is_refused_by_every_reader_alike(key: str) -> None:
    assert not is_label_key(key)
    with pytest.raises(EntryError):
        parse_selector(f"k8s:pod-label:{key}:web")
    with pytest.raises(SpecError, match="not a valid label key"):
        LabelSelector.parse({"matchLabels": {key: "web"}}, "spec.selector")
    document = {"policies": [{"selector": {"matchLabels": {key: "web"}}, "allow": []}]}
    with pytest.raises(PolicyError, match="not a valid label key"):
        authorizer_from_document(document, {})


@pytest.mark.parametrize("value", GOOD_VALUES)
def test_a_valid_label_value_is_accepted(value: str) -> None:
    assert is_label_value(value)
    LabelSelector.parse({"matchLabels": {"app": value}}, "spec.selector")


@pytest.mark.parametrize("value", BAD_VALUES)
def test_an_invalid_label_value_is_refused_by_every_reader_alike(value: str) -> None:
    assert not is_label_value(value)
    with pytest.raises(EntryError):
        parse_selector(f"k8s:pod-label:app:{value}")
    with pytest.raises(FieldError, match="not a valid label value"):
        LabelSelector.parse({"matchLabels": {"app": value}}, "spec.selector")


def test_non_strings_are_neither_keys_nor_values() -> None:
    for thing in (None, 1, True, b"app", ["app"]):
        assert not is_label_key(thing)
        assert not is_label_value(thing)


def test_the_operators_spec_error_is_the_field_error_the_grammar_raises() -> None:
    with pytest.raises(SpecError) as caught:
        LabelSelector.parse({"matchExpressions": [{"key": "app", "operator": "Near"}]}, "s")
    assert caught.value.field == "s.matchExpressions[0].operator"
