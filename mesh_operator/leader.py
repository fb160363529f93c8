"""Leader election on a ``coordination.k8s.io/v1`` Lease, decided by a pure function.

Two operator replicas must never both write entries, statuses or the webhook certificate.
The rule is client-go's ``leaderelection``: a replica may take the Lease if nobody holds
it, if it already holds it, or if the holder has not renewed it for
``leaseDurationSeconds``; every write carries the ``resourceVersion`` it read, so of two
replicas racing for an expired Lease the API server accepts exactly one (the other gets a
409 and stays a follower). A leader that cannot renew within the Lease duration stops
acting before anyone else may take over (``must_step_down``); the process then exits and
restarts as a follower, which is simpler to reason about than handing state back.

Every replica serves the admission webhook regardless; only the reconcilers and the
certificate rotation are leader-only.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = ["LeaseDecision", "LeaseRecord", "decide", "must_step_down"]


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _format_time(value: dt.datetime) -> str:
    # MicroTime: RFC 3339 with microseconds, as the API server writes it.
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    holder: str | None
    acquire_time: dt.datetime | None
    renew_time: dt.datetime | None
    duration_seconds: int
    transitions: int
    resource_version: str | None

    @classmethod
    def from_object(cls, obj: Any) -> LeaseRecord:
        obj = obj if isinstance(obj, dict) else {}
        spec = obj.get("spec") or {}
        meta = obj.get("metadata") or {}
        duration = spec.get("leaseDurationSeconds")
        transitions = spec.get("leaseTransitions")
        return cls(
            holder=spec.get("holderIdentity") or None,
            acquire_time=_parse_time(spec.get("acquireTime")),
            renew_time=_parse_time(spec.get("renewTime")),
            duration_seconds=duration if isinstance(duration, int) and duration > 0 else 15,
            transitions=transitions if isinstance(transitions, int) else 0,
            resource_version=meta.get("resourceVersion"),
        )

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_seconds,
            "leaseTransitions": self.transitions,
        }
        if self.acquire_time is not None:
            out["acquireTime"] = _format_time(self.acquire_time)
        if self.renew_time is not None:
            out["renewTime"] = _format_time(self.renew_time)
        return out

    def expired(self, now: dt.datetime) -> bool:
        if self.holder is None or self.renew_time is None:
            return True
        return now >= self.renew_time + dt.timedelta(seconds=self.duration_seconds)


@dataclass(frozen=True, slots=True)
class LeaseDecision:
    action: Literal["create", "renew", "acquire", "follow"]
    record: LeaseRecord | None  # what to write (None: write nothing)
    reason: str


def decide(
    current: LeaseRecord | None, *, identity: str, now: dt.datetime, duration_seconds: int
) -> LeaseDecision:
    if current is None:
        record = LeaseRecord(identity, now, now, duration_seconds, 0, None)
        return LeaseDecision("create", record, "no lease yet")
    if current.holder == identity:
        record = replace(current, renew_time=now, duration_seconds=duration_seconds)
        return LeaseDecision("renew", record, "we hold the lease")
    if current.expired(now):
        record = LeaseRecord(
            identity,
            now,
            now,
            duration_seconds,
            current.transitions + 1,
            current.resource_version,
        )
        return LeaseDecision("acquire", record, f"{current.holder or 'nobody'}'s lease expired")
    return LeaseDecision("follow", None, f"{current.holder} holds the lease")


def must_step_down(last_renewed: dt.datetime, *, now: dt.datetime, renew_deadline: float) -> bool:
    """True once a leader has failed to renew for ``renew_deadline`` seconds.

    ``renew_deadline`` must be shorter than the lease duration, so the old leader stops
    before a follower may consider the lease expired.
    """
    return now - last_renewed >= dt.timedelta(seconds=renew_deadline)
