"""``trellis check``: is the mesh healthy, and if not, what to do — one line per check.

As ``linkerd check``: each check prints ``✔ name: what was found`` or ``✘ name: what is
wrong`` followed by ``    fix: <one command or step>``; the exit status is 1 when any check
fails; ``-o json|yaml`` prints ``{"ok": ..., "checks": [{name, ok, detail, fix}]}``.

What is checked depends on what is given (each from the process itself):

* ``--ca-admin-socket`` (``ca serve --admin-socket``): the CA answers; its intermediate
  outlives the longest X509-SVID TTL of its entries (1 h when it has none), since the CA
  cuts SVIDs short at the intermediate's notAfter and refuses to sign in its last minute;
  at least one agent holds an SVID from it, and none of those is banned.
* ``--agent-admin ADDR`` (repeatable): the agent is healthy (``/healthz``) and, with the CA,
  holds the CA's trust bundle (``/config``).
* ``--sidecar-admin ADDR`` (repeatable): the sidecar holds an unexpired SVID and, with the
  CA, the CA's trust bundle.
* ``--kubeconfig`` or ``--kube``: through the API server, the CA server's Deployment has an
  available replica, the agents' DaemonSet is ready on every node it is scheduled to (an
  agent is ready once attested and synced with the CA), the operator's Deployment has an
  available replica, the injection webhook is configured with a ``caBundle`` and its
  serving certificate (the operator's Secret) is unexpired, for the webhook Service's DNS
  name, and issued by a CA of that ``caBundle``. Injection is ``failurePolicy: Fail``: an
  operator down or a broken webhook certificate blocks every pod creation in injected
  namespaces.

In a cluster the CA's admin socket is inside the CA's pod (an emptyDir the Deployment names
in ``TRELLIS_CA_ADMIN_SOCKET``), so the CA checks run there:
``kubectl -n trellis-system exec deploy/trellis-ca -- trellis check``. ``--kube`` does not
exec on its own: ``pods/exec`` is served by the node's kubelet, which no test control plane
here runs, and an untested path would be the one to break when it is needed.

Bundles are compared by their roots' serial numbers: a root rotation shows as a component
still holding the old set until the bundle reaches it.

The checks themselves are pure functions of what was fetched and ``now``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import datetime as dt
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from core.durations import format_duration
from core.errors import CliError
from core.output import add_output_argument, emit
from trellis.diagnose.admin_http import fetch_json, parse_address

__all__ = [
    "Check",
    "WebhookRef",
    "check_agent",
    "check_ca",
    "check_sidecar",
    "check_webhook",
    "check_workloads",
    "register",
]

CA_SOCKET_ENV = "TRELLIS_CA_ADMIN_SOCKET"
# With no entries, the default X509-SVID TTL (ca.x509svid.DEFAULT_X509_SVID_TTL).
DEFAULT_SVID_TTL = dt.timedelta(hours=1)
OPERATOR_NAMESPACE = "trellis-system"
MUTATING_WEBHOOK = "trellis-sidecar-injector"
WEBHOOK_SECRET = "trellis-webhook-tls"  # noqa: S105 - a Secret's name
WEBHOOK_SERVICE = "trellis-operator"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None


def _passed(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def _failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


def _whole(delta: dt.timedelta) -> str:
    # Whole seconds: what is left of a lifetime, not a measurement.
    return format_duration(dt.timedelta(seconds=max(1, round(delta.total_seconds()))))


def _left(when: dt.datetime, now: dt.datetime) -> str:
    return _whole(when - now) if when > now else "expired"


def _longest_ttl(entries: dict[str, Any]) -> dt.timedelta:
    ttls = [
        dt.timedelta(seconds=float(e["ttl"].rstrip("s")))
        for e in entries.get("entries") or []
        if str(e.get("ttl", "")).rstrip("s").replace(".", "", 1).isdigit()
    ]
    return max(ttls, default=DEFAULT_SVID_TTL)


def _moment(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso)


# -- the checks (pure) ---------------------------------------------------------------------


def check_ca(
    status: dict[str, Any], entries: dict[str, Any], agents: dict[str, Any], now: dt.datetime
) -> Iterator[Check]:
    """The intermediate's expiry and the attested agents, from the CA's admin socket."""
    cluster = status["cluster"]
    intermediate = _moment(status["intermediate"]["not_after"])
    name = "CA intermediate valid"
    expiry = f"{intermediate:%Y-%m-%d %H:%M} UTC"
    detail = f"cluster {cluster}, expires in {_left(intermediate, now)} ({expiry})"
    rotate = (
        f"trellis ca intermediate rotate --dir CA_DIR --cluster {cluster}"
        " (ca serve picks it up without a restart)"
    )
    if intermediate <= now:
        yield _failed(name, f"cluster {cluster}: the intermediate has expired", rotate)
    elif intermediate - now < (longest := _longest_ttl(entries)):
        yield _failed(
            name,
            f"{detail}: sooner than the longest SVID TTL ({format_duration(longest)}),"
            " so SVIDs are cut short",
            rotate,
        )
    else:
        yield _passed(name, detail)

    listed = agents["agents"]
    name = "agents attested"
    banned = [a["node"] for a in listed if a["banned"]]
    if not listed:
        yield _failed(
            name,
            "no agent holds an SVID from this CA",
            "start an agent: trellis ca token create --dir CA_DIR --cluster"
            f" {cluster} --node NODE --out FILE, then trellis agent --join-token-file FILE ...",
        )
    elif banned:
        yield _failed(
            name,
            f"banned node(s) still hold an SVID: {', '.join(banned)}",
            "it lapses at its expiry; until then the CA refuses every call of theirs",
        )
    else:
        nodes = ", ".join(a["node"] for a in listed)
        yield _passed(name, f"{len(listed)} agent(s): {nodes}")


def _roots(serials: set[str]) -> str:
    return ", ".join(sorted(serials)) or "none"


def _bundle_check(who: str, held: set[str], ca_roots: set[str] | None, fix: str) -> Iterator[Check]:
    if ca_roots is None:
        return
    name = f"{who} bundle matches the CA's"
    if held == ca_roots:
        yield _passed(name, f"roots {_roots(held)}")
    else:
        yield _failed(name, f"holds roots {_roots(held)}, the CA {_roots(ca_roots)}", fix)


def check_agent(
    address: str,
    health: dict[str, Any],
    config: dict[str, Any] | None,
    ca_roots: set[str] | None,
) -> Iterator[Check]:
    name = f"agent {address} healthy"
    status = health.get("status")
    error = health.get("last_error") or "none recorded"
    if status in ("ok", "degraded"):
        note = " (CA unreachable, serving its cache)" if status == "degraded" else ""
        yield _passed(name, f"node {health.get('node')}, {health.get('entries')} entries{note}")
    elif status == "starting":
        yield _failed(
            name,
            "not synced with the CA yet",
            f"check that it can reach the CA and attest (last error: {error})",
        )
    else:
        yield _failed(
            name,
            f"{status}: {health.get('entries_without_svid')} entries without an SVID",
            f"check its upstream (last error: {error}); an expired agent SVID needs a restart",
        )
    if config is not None:
        bundle = (config.get("cache") or {}).get("bundle") or {}
        held = {c["serial"] for c in bundle.get("x509_authorities") or []}
        upstream = config.get("upstream") or {}
        yield from _bundle_check(
            f"agent {address}",
            held,
            ca_roots,
            "the agent streams the bundle from the CA: check its upstream"
            f" {upstream.get('address')} (last error: {error})",
        )


def check_sidecar(
    address: str, config: dict[str, Any], ca_roots: set[str] | None, now: dt.datetime
) -> Iterator[Check]:
    identity = config.get("identity") or {}
    workload_api = config.get("workload_api") or {}
    target = workload_api.get("target")
    error = workload_api.get("last_error") or "none recorded"
    name = f"sidecar {address} holds an SVID"
    not_after = identity.get("not_after")
    fix = (
        f"it fetches its SVID from the agent at {target} (last error: {error}); check that"
        " an entry's selectors match the sidecar: trellis ca entries list"
    )
    if not not_after:
        yield _failed(name, "no SVID yet", fix)
    elif _moment(not_after) <= now:
        yield _failed(name, f"its SVID for {identity.get('spiffe_id')} has expired", fix)
    else:
        yield _passed(
            name,
            f"{identity.get('spiffe_id')}, expires in {_left(_moment(not_after), now)}",
        )
    held = {s for serials in (identity.get("bundles") or {}).values() for s in serials}
    yield from _bundle_check(
        f"sidecar {address}",
        held,
        ca_roots,
        f"the sidecar gets the bundle from the agent at {target}: check the agent first",
    )


def _certificates(pem_b64: str | bytes | None) -> list[x509.Certificate]:
    if not pem_b64:
        return []
    try:
        data = base64.b64decode(pem_b64, validate=True)
        return list(x509.load_pem_x509_certificates(data))
    except (binascii.Error, ValueError):
        return []


@dataclass(frozen=True, slots=True)
class WebhookRef:
    """Which webhook to check: its configuration's name, and the Service and Secret that
    serve it (the Service as the configuration names it, else the operator's defaults)."""

    configuration: str = MUTATING_WEBHOOK
    namespace: str = OPERATOR_NAMESPACE
    service: str = WEBHOOK_SERVICE
    secret: str = WEBHOOK_SECRET

    def served_by(self, configuration: dict[str, Any]) -> WebhookRef:
        for hook in configuration.get("webhooks") or []:
            service = (hook.get("clientConfig") or {}).get("service")
            if service and service.get("name") and service.get("namespace"):
                return dataclasses.replace(
                    self, namespace=service["namespace"], service=service["name"]
                )
        return self


def check_webhook(
    configuration: dict[str, Any] | None,
    secret: dict[str, str] | None,
    now: dt.datetime,
    ref: WebhookRef,
) -> Iterator[Check]:
    """The injection webhook: configured with a caBundle, and a valid serving certificate."""
    name = "webhook configured"
    namespace = ref.namespace
    restart = (
        f"kubectl -n {namespace} rollout restart deployment/{ref.service} (the operator's"
        " leader renews the webhook certificate at start, then hourly)"
    )
    if configuration is None:
        yield _failed(
            name,
            f"no MutatingWebhookConfiguration {ref.configuration}",
            "install the manifests: kubectl apply -k manifests/ --server-side",
        )
        return
    hooks = configuration.get("webhooks") or []
    bundles = [(h.get("clientConfig") or {}).get("caBundle") for h in hooks]
    if not hooks or not all(bundles):
        yield _failed(
            name,
            f"{ref.configuration} has a webhook without a caBundle",
            "the operator's leader writes it; is the operator running? kubectl -n"
            f" {namespace} get pods -l app.kubernetes.io/name=trellis-operator",
        )
        return
    policies = sorted({str(h.get("failurePolicy", "Fail")) for h in hooks})
    yield _passed(
        name,
        f"{ref.configuration}: {len(hooks)} webhook(s), failurePolicy {'/'.join(policies)}",
    )

    name = "webhook certificate valid"
    serving = _certificates((secret or {}).get("tls.crt"))
    if not serving:
        yield _failed(
            name,
            f"Secret {namespace}/{ref.secret} holds no serving certificate",
            restart,
        )
        return
    leaf = serving[0]
    not_after = leaf.not_valid_after_utc
    if not_after <= now:
        yield _failed(
            name,
            f"the serving certificate expired {_whole(now - not_after)} ago"
            f" ({not_after:%Y-%m-%d %H:%M} UTC): the API server refuses the webhook, and"
            " with failurePolicy Fail every injected pod creation fails",
            restart,
        )
        return
    wanted = f"{ref.service}.{namespace}.svc"
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if wanted not in dns:
        yield _failed(name, f"the serving certificate does not name {wanted}", restart)
        return
    anchors = [c for b in bundles for c in _certificates(b)]
    if not any(_issued_by(leaf, anchor) for anchor in anchors):
        yield _failed(
            name,
            f"the serving certificate is not issued by a CA of {ref.configuration}'s caBundle",
            restart,
        )
        return
    yield _passed(name, f"{wanted}, expires in {_left(not_after, now)}")


def _issued_by(leaf: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):  # other issuer, key type, signature
        return False
    return True


def check_workloads(
    ca: dict[str, Any] | None,
    agents: dict[str, Any] | None,
    operator: dict[str, Any] | None,
    namespace: str,
) -> Iterator[Check]:
    """The control plane's Deployments and DaemonSet, as their controllers report them."""
    install = "install the manifests: kubectl apply -k manifests/ --server-side"
    for name, kind, workload, label, why in (
        ("CA server available", "Deployment", ca, "trellis-ca", "agents cannot renew SVIDs"),
        (
            "operator available",
            "Deployment",
            operator,
            "trellis-operator",
            "with failurePolicy Fail, injected pods cannot be created",
        ),
    ):
        if workload is None:
            yield _failed(name, f"no {kind} {namespace}/{label}", install)
            continue
        status = workload.get("status") or {}
        wanted = (workload.get("spec") or {}).get("replicas", 1)
        available = status.get("availableReplicas") or 0
        detail = f"{available}/{wanted} replica(s) available"
        if available >= 1:
            yield _passed(name, detail)
        else:
            yield _failed(
                name,
                f"{detail}: {why}",
                f"kubectl -n {namespace} describe deployment {label}; kubectl -n {namespace}"
                f" logs deployment/{label}",
            )
    name = "agents ready"
    if agents is None:
        yield _failed(name, f"no DaemonSet {namespace}/trellis-agent", install)
        return
    status = agents.get("status") or {}
    desired = status.get("desiredNumberScheduled") or 0
    ready = status.get("numberReady") or 0
    detail = f"{ready}/{desired} node(s) with an attested, synced agent"
    if desired and ready == desired:
        yield _passed(name, detail)
    else:
        yield _failed(
            name,
            detail + ("" if desired else ": scheduled on no node"),
            f"kubectl -n {namespace} get pods -l app.kubernetes.io/name=trellis-agent -o wide;"
            f" kubectl -n {namespace} logs daemonset/trellis-agent",
        )


# -- gathering (I/O) -----------------------------------------------------------------------


def _gather_ca(path: Path, now: dt.datetime) -> tuple[list[Check], set[str] | None]:
    from ca.server.admin_client import AdminClientError, fetch_admin

    name = "CA reachable"
    try:
        status = fetch_admin(path, "/status")
        entries = fetch_admin(path, "/entries")
        agents = fetch_admin(path, "/agents")
    except AdminClientError as exc:
        fix = (
            "start the CA server (trellis ca serve ... --admin-socket PATH), or point"
            f" --ca-admin-socket / ${CA_SOCKET_ENV} at its socket"
        )
        return [_failed(name, str(exc), fix)], None
    checks = [
        _passed(
            name, f"{path} (trust domain {status['trust_domain']}, cluster {status['cluster']})"
        )
    ]
    checks.extend(check_ca(status, entries, agents, now))
    return checks, {r["serial"] for r in status["bundle"]["roots"]}


def _address(text: str) -> tuple[str, int] | None:
    try:
        return parse_address(text)
    except ValueError:
        return None


def _gather_agent(address: str, ca_roots: set[str] | None) -> list[Check]:
    hostport = _address(address)
    if hostport is None:
        raise CliError(f"--agent-admin {address!r} is not HOST:PORT")
    try:
        health = fetch_json(*hostport, "/healthz")
    except CliError as exc:
        return [
            _failed(
                f"agent {address} healthy",
                str(exc),
                "start the agent with --admin HOST:PORT, or correct --agent-admin",
            )
        ]
    try:
        config: dict[str, Any] | None = fetch_json(*hostport, "/config")
    except CliError:
        config = None  # an agent from before /config: health only
    if config is not None and "cache" not in config:
        config = None  # refused: /config answers loopback callers only (ca.agent.admin)
    return list(check_agent(address, health, config, ca_roots))


def _gather_sidecar(address: str, ca_roots: set[str] | None, now: dt.datetime) -> list[Check]:
    hostport = _address(address)
    if hostport is None:
        raise CliError(f"--sidecar-admin {address!r} is not HOST:PORT")
    try:
        config = fetch_json(*hostport, "/config")
    except CliError as exc:
        return [
            _failed(
                f"sidecar {address} holds an SVID",
                str(exc),
                "is the sidecar running? its admin port is --admin-port (15000 in a pod)",
            )
        ]
    return list(check_sidecar(address, config, ca_roots, now))


def _gather_kube(kubeconfig: Path | None, ref: WebhookRef, now: dt.datetime) -> list[Check]:
    from trellis.diagnose.kube import (
        api_client,
        read_mutating_webhook,
        read_secret_data,
        read_workload,
    )

    try:
        api = api_client(kubeconfig)
    except CliError as exc:
        return [_failed("API server reachable", str(exc), "give --kubeconfig FILE")]
    namespace = ref.namespace
    try:
        ca = read_workload(api, "Deployment", namespace, "trellis-ca")
        agents = read_workload(api, "DaemonSet", namespace, "trellis-agent")
        operator = read_workload(api, "Deployment", namespace, "trellis-operator")
    except CliError as exc:
        return [_failed("API server reachable", str(exc), "check --kubeconfig and RBAC")]
    checks = list(check_workloads(ca, agents, operator, namespace))
    try:
        configuration: dict[str, Any] | None = read_mutating_webhook(api, ref.configuration)
    except CliError as exc:
        if "not found" not in str(exc):
            return [_failed("API server reachable", str(exc), "check --kubeconfig and RBAC")]
        configuration = None
    if configuration is not None:
        ref = ref.served_by(configuration)
    secret: dict[str, str] | None
    try:
        secret = read_secret_data(api, ref.namespace, ref.secret)
    except CliError:
        secret = None
    return checks + list(check_webhook(configuration, secret, now, ref))


# -- the command ---------------------------------------------------------------------------


def register(commands: Any) -> None:
    p = commands.add_parser(
        "check", help="check the mesh's health, one line per check with a fix (exit 1 on failure)"
    )
    p.add_argument(
        "--ca-admin-socket",
        type=Path,
        metavar="PATH",
        help=f"the CA server's admin socket (ca serve --admin-socket; default ${CA_SOCKET_ENV})",
    )
    p.add_argument(
        "--agent-admin",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="an agent's admin address (repeatable)",
    )
    p.add_argument(
        "--sidecar-admin",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a sidecar's admin address (repeatable)",
    )
    p.add_argument(
        "--kube",
        action="store_true",
        help="check the injection webhook through the API server ($KUBECONFIG, ~/.kube/config)",
    )
    p.add_argument("--kubeconfig", type=Path, help="check the webhook with this kubeconfig")
    p.add_argument(
        "--webhook",
        default=MUTATING_WEBHOOK,
        metavar="NAME",
        help=f"the injection MutatingWebhookConfiguration (default {MUTATING_WEBHOOK})",
    )
    p.add_argument(
        "--webhook-secret",
        default=WEBHOOK_SECRET,
        metavar="NAME",
        help="the Secret holding its serving certificate, in the namespace of the Service"
        f" the webhook names (default {WEBHOOK_SECRET})",
    )
    p.add_argument(
        "--operator-namespace",
        default=OPERATOR_NAMESPACE,
        help="where the CA, agents and operator run, and the webhook's Service and Secret"
        f" when the webhook names no Service (default {OPERATOR_NAMESPACE})",
    )
    add_output_argument(p)
    p.set_defaults(handler=cmd_check)


def _text(document: dict[str, Any]) -> Iterator[str]:
    for check in document["checks"]:
        yield f"{'✔' if check['ok'] else '✘'} {check['name']}: {check['detail']}"
        if check["fix"]:
            yield f"    fix: {check['fix']}"
    failed = sum(1 for c in document["checks"] if not c["ok"])
    yield "all checks passed" if not failed else f"{failed} check(s) failed"


def cmd_check(args: argparse.Namespace) -> int:
    import os

    socket = args.ca_admin_socket
    if socket is None and os.environ.get(CA_SOCKET_ENV):
        socket = Path(os.environ[CA_SOCKET_ENV])
    kube = args.kube or args.kubeconfig is not None
    if socket is None and not args.agent_admin and not args.sidecar_admin and not kube:
        raise CliError(
            "nothing to check: give --ca-admin-socket, --agent-admin, --sidecar-admin or"
            " --kube/--kubeconfig"
        )
    now = dt.datetime.now(dt.UTC)
    checks: list[Check] = []
    ca_roots: set[str] | None = None
    if socket is not None:
        found, ca_roots = _gather_ca(socket, now)
        checks.extend(found)
    for address in args.agent_admin:
        checks.extend(_gather_agent(address, ca_roots))
    for address in args.sidecar_admin:
        checks.extend(_gather_sidecar(address, ca_roots, now))
    if kube:
        ref = WebhookRef(
            args.webhook, args.operator_namespace, WEBHOOK_SERVICE, args.webhook_secret
        )
        checks.extend(_gather_kube(args.kubeconfig, ref, now))
    document = {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}
    emit(document, args.output, _text)
    return 0 if document["ok"] else 1
