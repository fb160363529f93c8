"""Status conditions (``metav1.Condition``) as values, merged without losing history.

``merge_conditions`` keeps a condition's ``lastTransitionTime`` when its status did not
change, so re-reconciling an unchanged object produces an identical status and the shell
can skip the PATCH (no write amplification, no watch event storm).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Condition", "merge_conditions"]


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str

    @classmethod
    def of(cls, type_: str, ok: bool, reason: str, message: str) -> Condition:
        return cls(type_, "True" if ok else "False", reason, message)


def _timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    previous: Any, current: Iterable[Condition], *, generation: int, now: dt.datetime
) -> list[dict[str, Any]]:
    """The ``status.conditions`` list for ``current``, given what the object had before."""
    old: dict[str, Mapping[str, Any]] = {}
    if isinstance(previous, Sequence):
        for item in previous:
            if isinstance(item, Mapping) and isinstance(item.get("type"), str):
                old[item["type"]] = item
    merged: list[dict[str, Any]] = []
    for condition in current:
        before = old.get(condition.type)
        since = _timestamp(now)
        if (
            before is not None
            and before.get("status") == condition.status
            and isinstance(before.get("lastTransitionTime"), str)
        ):
            since = before["lastTransitionTime"]
        merged.append(
            {
                "type": condition.type,
                "status": condition.status,
                "reason": condition.reason,
                "message": condition.message,
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )
    return merged
