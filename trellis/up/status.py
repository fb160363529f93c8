"""The live status of ``trellis up``: scraped from the processes, rendered as a few lines.

Everything shown comes from the processes' own endpoints (``/metrics`` in the Prometheus
text format, and each sidecar's ``/config``), never from ``trellis up``'s own idea of
what should be happening: if the status says X25519MLKEM768, a sidecar counted a
handshake that negotiated it. ``collect`` does the I/O; ``render`` is pure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import shlex
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Samples", "Snapshot", "StatusView", "collect", "fetch_json", "render", "scrape"]

_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class Samples:
    """One scrape: (name, labels, value) rows, queried by name and label subset."""

    rows: tuple[tuple[str, dict[str, str], float], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Samples:
        rows = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                rows.append((sample.name, dict(sample.labels), float(sample.value)))
        return cls(tuple(rows))

    def sum(self, name: str, **labels: str) -> float:
        return sum(
            value
            for n, have, value in self.rows
            if n == name and all(have.get(k) == v for k, v in labels.items())
        )

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.rows)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for n, have, value in self.rows:
            if n == name and label in have:
                out[have[label]] = out.get(have[label], 0.0) + value
        return out


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT) as response:  # noqa: S310 (loopback http)
            return bytes(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def scrape(url: str) -> Samples | None:
    body = _get(url)
    if body is None:
        return None
    try:
        return Samples.parse(body.decode("utf-8", "replace"))
    except ValueError:
        return None


def fetch_json(url: str) -> dict[str, Any] | None:
    body = _get(url)
    if body is None:
        return None
    with contextlib.suppress(ValueError):
        doc = json.loads(body)
        if isinstance(doc, dict):
            return doc
    return None


@dataclass(frozen=True, slots=True)
class SidecarInfo:
    name: str  # the workload it fronts: "load", "echo"
    spiffe_id: str
    admin: str  # http://host:port


@dataclass(frozen=True, slots=True)
class StatusView:
    """What does not change during a run."""

    trust_domain: str
    run_dir: str
    metrics: Mapping[str, str]  # process name -> /metrics URL
    sidecars: tuple[SidecarInfo, ...]
    caller: str = "load"  # the sidecar whose outbound side carries the demo traffic
    callee: str = "echo"
    policy_probe: str | None = None  # what became of a call from an identity not allowed
    stop_after: float | None = None  # --duration, seconds
    isolation: str | None = None  # which uids the workloads run as, and why
    # Where `trellis check` (and `trellis ca entries list`) ask the CA and the agent.
    ca_admin_socket: str | None = None
    agent_admin: str | None = None  # host:port


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float  # time.time()
    elapsed: float
    metrics: dict[str, Samples | None] = field(default_factory=dict)
    configs: dict[str, dict[str, Any] | None] = field(default_factory=dict)


def collect(view: StatusView, at: float, elapsed: float) -> Snapshot:
    return Snapshot(
        at=at,
        elapsed=elapsed,
        metrics={name: scrape(url) for name, url in view.metrics.items()},
        configs={s.name: fetch_json(f"{s.admin}/config") for s in view.sidecars},
    )


def _n(value: float) -> str:
    return f"{int(value):,}"


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _left(seconds: float) -> str:
    if seconds <= 0:
        return "EXPIRED"
    if seconds < 120:
        return f"{seconds:.0f}s left"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m left"
    return f"{seconds / 3600:.1f}h left"


@dataclass(frozen=True, slots=True)
class _Svid:
    spiffe_id: str | None = None
    not_after: float | None = None  # UNIX time
    serial: str | None = None
    generation: int | None = None  # the sidecar's count of SVID/bundle updates received


def _svid_from_config(config: dict[str, Any] | None) -> _Svid:
    """The SVID a sidecar's ``/config`` reports under ``identity`` (sidecar/__init__.py)."""
    identity = (config or {}).get("identity")
    if not isinstance(identity, dict):
        return _Svid()
    spiffe_id, serial = identity.get("spiffe_id"), identity.get("serial")
    generation = identity.get("generation")
    not_after: float | None = None
    raw = identity.get("not_after")
    if isinstance(raw, str):
        with contextlib.suppress(ValueError):
            parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
            not_after = parsed.timestamp()
    return _Svid(
        spiffe_id if isinstance(spiffe_id, str) else None,
        not_after,
        serial if isinstance(serial, str) else None,
        generation if isinstance(generation, int) else None,
    )


def _plural(count: float, word: str) -> str:
    return f"{_n(count)} {word}" + ("" if int(count) == 1 else "s")


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def check_command(view: StatusView) -> str:
    """``trellis check`` against this mesh's CA, agent and sidecars, ready to paste."""
    argv = ["trellis", "check"]
    if view.ca_admin_socket is not None:
        argv += ["--ca-admin-socket", view.ca_admin_socket]
    if view.agent_admin is not None:
        argv += ["--agent-admin", view.agent_admin]
    for sidecar in view.sidecars:
        argv += ["--sidecar-admin", sidecar.admin.removeprefix("http://")]
    return shlex.join(argv)


def render(view: StatusView, now: Snapshot, before: Snapshot | None = None) -> str:
    """The status block: a dozen lines, each a fact read from a process."""
    m = now.metrics
    lines = [
        f"trellis up | {view.trust_domain} | up {_clock(now.elapsed)}"
        + (f" of {_clock(view.stop_after)}" if view.stop_after is not None else "")
        + " | Ctrl-C stops"
        f" | run dir {view.run_dir}"
    ]
    # -- identities ------------------------------------------------------------------
    for index, sidecar in enumerate(view.sidecars):
        samples = m.get(f"sidecar-{sidecar.name}")
        svid = _svid_from_config(now.configs.get(sidecar.name))
        expiry = svid.not_after
        if expiry is None and samples is not None:
            expiry = samples.sum("trellis_sidecar_svid_expiry_timestamp_seconds") or None
        ttl = _left(expiry - now.at) if expiry is not None else "no SVID yet"
        detail = f", serial {svid.serial[:12]}" if svid.serial else ""
        if svid.generation:
            detail += f", identity update {svid.generation}"
        head = "identity " if index == 0 else "         "
        lines.append(
            f" {head} {sidecar.name:<8} {svid.spiffe_id or sidecar.spiffe_id}  {ttl}{detail}"
        )
    if view.isolation is not None:
        lines.append(f" uids      {view.isolation}")
    # -- TLS -----------------------------------------------------------------------------
    groups: dict[str, float] = {}
    schemes: dict[str, float] = {}
    suites: dict[str, float] = {}
    handshakes = app_connections = 0.0
    resumed: float | None = None
    for sidecar in view.sidecars:
        samples = m.get(f"sidecar-{sidecar.name}")
        if samples is None:
            continue
        for group, count in samples.by_label("tls_group_total", "group").items():
            groups[group] = groups.get(group, 0) + count
        by_scheme = samples.by_label("trellis_sidecar_tls_signature_scheme_total", "scheme")
        for scheme, count in by_scheme.items():
            schemes[scheme] = schemes.get(scheme, 0) + count
        for suite, count in samples.by_label("tls_cipher_suite_total", "suite").items():
            suites[suite] = suites.get(suite, 0) + count
        if sidecar.name == view.caller:
            handshakes = samples.sum("trellis_sidecar_tls_handshakes_total", direction="outbound")
            app_connections = samples.sum(
                "trellis_sidecar_app_connections_total", direction="outbound"
            )
            if samples.has("tls_resumption_total"):
                resumed = samples.sum("tls_resumption_total") - samples.sum(
                    "tls_resumption_total", kind="none"
                )
    seen = [
        f"{g} ({_n(c)} handshakes)" for g, c in sorted(groups.items(), key=lambda i: -i[1]) if c
    ]
    # The signature scheme beside the group: mldsa65 under trellis up --pq-signatures.
    seen += [s for s, c in sorted(schemes.items(), key=lambda i: -i[1]) if c]
    seen += [s for s, c in suites.items() if c]
    lines.append(f" tls       {', '.join(seen) if seen else 'no handshake yet'}")
    # -- traffic -------------------------------------------------------------------------
    load = m.get("load")
    if load is not None:
        ok = load.sum("trellis_demo_load_requests_total", outcome="ok")
        total = load.sum("trellis_demo_load_requests_total")
        errors = total - ok
        rate = ""
        previous = before.metrics.get("load") if before is not None else None
        if before is not None and previous is not None and now.at > before.at:
            delta = ok - previous.sum("trellis_demo_load_requests_total", outcome="ok")
            rate = f" ({delta / (now.at - before.at):.0f}/s)"
        kinds = load.by_label("trellis_demo_load_requests_total", "outcome")
        detail = ", ".join(f"{k} {_n(v)}" for k, v in kinds.items() if k != "ok" and v)
        p50 = load.sum("trellis_demo_load_latency_seconds", quantile="0.5")
        p99 = load.sum("trellis_demo_load_latency_seconds", quantile="0.99")
        lines.append(
            f" traffic   {_n(total)} requests{rate}, {_n(errors)} errors"
            + (f" ({detail})" if detail else "")
            + f", latency p50 {_ms(p50)} p99 {_ms(p99)}"
        )
    else:
        lines.append(" traffic   load generator not answering")
    per = f" ({handshakes / app_connections:.2f} per app connection)" if app_connections else ""
    callee = m.get(f"sidecar-{view.callee}")
    # Resumed handshakes skip the certificate work; when the callee is declared HTTP
    # (MeshConfig.declare_http), a safe request that made the pool dial rides in their
    # 0-RTT data, and the callee counts what it served and what it answered 425.
    if resumed is not None:
        per += f", {_n(resumed)} resumed"
    if callee is not None:
        early = callee.by_label("trellis_sidecar_early_data_requests_total", "decision")
        if early.get("served"):
            per += f", {_plural(early['served'], 'request')} served from 0-RTT"
        if early.get("too_early"):
            per += f", {_n(early['too_early'])} answered 425 Too Early"
    lines.append(
        f" pooling   {_plural(handshakes, 'TLS handshake')} for"
        f" {_plural(app_connections, 'app connection')}"
        f" {view.caller}->{view.callee}{per}"
    )
    if callee is not None:
        allowed = callee.sum("trellis_sidecar_policy_decisions_total", decision="allow")
        denied = callee.sum("trellis_sidecar_policy_decisions_total", decision="deny")
        probe = f"; intruder's call {view.policy_probe}" if view.policy_probe else ""
        lines.append(
            f" policy    {view.callee} admits only {view.caller}: {_n(allowed)} allowed,"
            f" {_n(denied)} denied{probe}"
        )
    # -- issuance ------------------------------------------------------------------------
    ca, agent = m.get("ca"), m.get("agent")
    parts = []
    if ca is not None:
        issued = ca.by_label("trellis_ca_x509_svid_issued_total", "kind")
        parts.append(
            f"CA issued {_n(sum(issued.values()))} X509-SVIDs"
            + (
                f" ({', '.join(f'{k} {_n(v)}' for k, v in sorted(issued.items()))})"
                if issued
                else ""
            )
        )
    if agent is not None:
        rotations = agent.by_label("trellis_agent_svid_rotations_total", "kind")
        parts.append(
            "agent: " + ", ".join(f"{k} {_n(v)}" for k, v in sorted(rotations.items()))
            if rotations
            else "agent: none yet"
        )
    lines.append(f" issuance  {'; '.join(parts) if parts else 'CA and agent not answering'}")
    # -- admin endpoints, and the check command that reads them -------------------------
    if view.ca_admin_socket is not None and view.agent_admin is not None:
        lines.append(f" admin     CA socket {view.ca_admin_socket}, agent {view.agent_admin}")
        lines.append(f" check     {check_command(view)}")
    # -- endpoints -----------------------------------------------------------------------
    for index, (name, url) in enumerate(view.metrics.items()):
        head = "metrics  " if index == 0 else "         "
        state = "" if m.get(name) is not None else "  (not answering)"
        lines.append(f" {head} {name:<16} {url}{state}")
    return "\n".join(lines)
