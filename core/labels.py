"""Kubernetes labels: the grammar of keys and values, and label selectors as frozen values.

One grammar for every place Trellis reads a label: the CA's ``k8s:pod-label`` selectors,
the operator's CRDs and the sidecar's policy document. Keys are an optional DNS-1123
subdomain prefix (at most 253 characters) and ``/``, then a name of at most 63
alphanumerics, ``-``, ``_`` and ``.``, beginning and ending alphanumeric; values are empty
or such a name (Kubernetes' ``IsQualifiedName`` and ``IsValidLabelValue``).

``LabelSelector.parse`` takes the API's JSON form (``matchLabels`` and ``matchExpressions``
with ``In``, ``NotIn``, ``Exists``, ``DoesNotExist``) and raises ``FieldError`` naming the
field; ``matches`` is the API server's semantics (every requirement must hold; an empty
selector selects everything).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.errors import FieldError

__all__ = [
    "LabelSelector",
    "Requirement",
    "check_label_key",
    "check_label_value",
    "is_label_key",
    "is_label_value",
]

_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})
_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MAX_NAME = 63
_MAX_PREFIX = 253


def is_label_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    prefix, slash, name = key.rpartition("/")
    if slash and not (len(prefix) <= _MAX_PREFIX and _DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    return len(name) <= _MAX_NAME and _NAME.fullmatch(name) is not None


def is_label_value(value: object) -> bool:
    return isinstance(value, str) and (
        value == "" or (len(value) <= _MAX_NAME and _NAME.fullmatch(value) is not None)
    )


def check_label_key(key: Any, where: str) -> str:
    if not is_label_key(key):
        raise FieldError(where, f"{key!r} is not a valid label key")
    return str(key)


def check_label_value(value: Any, where: str) -> str:
    if not is_label_value(value):
        raise FieldError(where, f"{value!r} is not a valid label value")
    return str(value)


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values  # NotIn

    @property
    def positive(self) -> bool:
        """True if a pod can satisfy it by carrying a label (what an agent can attest)."""
        return self.operator in ("In", "Exists")

    def __str__(self) -> str:
        if self.operator == "Exists":
            return self.key
        if self.operator == "DoesNotExist":
            return f"!{self.key}"
        op = "in" if self.operator == "In" else "notin"
        return f"{self.key} {op} ({','.join(sorted(self.values))})"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A parsed ``metav1.LabelSelector``; ``LabelSelector()`` selects everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def parse(cls, raw: Any, where: str) -> LabelSelector:
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise FieldError(where, "expected an object with matchLabels and/or matchExpressions")
        unknown = sorted(set(raw) - {"matchLabels", "matchExpressions"})
        if unknown:
            raise FieldError(where, f"unknown field(s) {', '.join(unknown)}")
        requirements: list[Requirement] = []
        labels = raw.get("matchLabels") or {}
        if not isinstance(labels, Mapping):
            raise FieldError(f"{where}.matchLabels", "expected a map of label key to value")
        for key, value in sorted(labels.items()):
            check_label_key(key, f"{where}.matchLabels")
            check_label_value(value, f"{where}.matchLabels[{key}]")
            requirements.append(Requirement(key, "In", frozenset({value})))
        expressions = raw.get("matchExpressions") or []
        if not isinstance(expressions, list):
            raise FieldError(f"{where}.matchExpressions", "expected a list")
        for index, expr in enumerate(expressions):
            at = f"{where}.matchExpressions[{index}]"
            if not isinstance(expr, Mapping):
                raise FieldError(at, "expected an object with key, operator, values")
            key = check_label_key(expr.get("key"), f"{at}.key")
            operator = expr.get("operator")
            if operator not in _OPERATORS:
                raise FieldError(
                    f"{at}.operator", f"{operator!r} is not one of {', '.join(sorted(_OPERATORS))}"
                )
            values = expr.get("values") or []
            if not isinstance(values, list):
                raise FieldError(f"{at}.values", "expected a list of strings")
            checked = frozenset(check_label_value(v, f"{at}.values") for v in values)
            if operator in ("In", "NotIn") and not checked:
                raise FieldError(f"{at}.values", f"operator {operator} needs at least one value")
            if operator in ("Exists", "DoesNotExist") and checked:
                raise FieldError(f"{at}.values", f"operator {operator} takes no values")
            requirements.append(Requirement(key, operator, checked))
        return cls(tuple(requirements))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def to_dict(self) -> dict[str, Any]:
        """The API form (as ``matchExpressions``), for documents the sidecar reads."""
        return {
            "matchExpressions": [
                {"key": r.key, "operator": r.operator, "values": sorted(r.values)}
                if r.values
                else {"key": r.key, "operator": r.operator}
                for r in self.requirements
            ]
        }

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.key for r in self.requirements))

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements) or "(everything)"
