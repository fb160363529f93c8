"""``trellis policy explain --caller SPIFFE_ID --port N``: would the sidecar admit this caller
on this port, and which rule decides.

The verdict is ``sidecar.policy.Authorizer.decide``, the very function the inbound sidecar
runs on every CONNECT, over an ``Authorizer`` built the way the sidecar builds it
(``authorizer_for_pod`` from the namespace's ``SidecarPolicy`` document and the pod's
labels). The policies listed beside it are the document's, read with
``meshapi.policy.parse_policy_document``; they explain the verdict and never change it.

Where the policy comes from, one of:

* ``--policy FILE``: a ``SidecarPolicy`` document (JSON, as the operator writes it into the
  ``trellis-policy`` ConfigMap, or YAML), with ``--labels`` for the pod;
* ``--namespace NS``: that ConfigMap, read through the API server, with ``--labels`` or
  ``--pod NAME`` (whose labels are read too);
* ``--sidecar ADDR``: the policy a running sidecar enforces, from its admin ``/config``.

Exit status: 0 when the caller is admitted, 1 when it is refused (as ``kubectl auth
can-i``), 2 for a malformed command line.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from ca.cliargs import spiffe_id as _spiffe_id
from ca.cliargs import trust_domain as _trust_domain
from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from core.errors import CliError, FieldError
from core.output import add_output_argument, emit
from meshapi.policy import CallerRule, PolicyDocument, parse_policy_document
from sidecar.policy import Authorizer, authorizer_for_pod
from trellis.diagnose.admin_http import fetch_json, parse_address

__all__ = ["explain", "register"]


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels


def register(commands: Any) -> None:
    policy = commands.add_parser("policy", help="access policy tools")
    sub = policy.add_subparsers(dest="policy_command", metavar="POLICY_COMMAND", required=True)
    p = sub.add_parser(
        "explain",
        help="which rule admits or refuses a caller on a port (exit 1 when refused)",
    )
    p.add_argument("--caller", required=True, type=_spiffe_id, help="the caller's SPIFFE ID")
    p.add_argument("--port", required=True, type=_port, help="the port the caller connects to")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--policy", type=Path, metavar="FILE", help="a SidecarPolicy document (JSON or YAML)"
    )
    source.add_argument(
        "-n",
        "--namespace",
        help="read the namespace's trellis-policy ConfigMap through the API server",
    )
    source.add_argument(
        "--sidecar", metavar="ADDR", help="ask a running sidecar's admin port (HOST:PORT)"
    )
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--labels",
        type=_labels,
        default={},
        metavar="K=V,...",
        help="the called pod's labels (default: none)",
    )
    who.add_argument("--pod", help="with --namespace: take the labels of this pod")
    p.add_argument(
        "--trust-domain",
        type=_trust_domain,
        help="the called sidecar's trust domain (default: the document's, or the sidecar's)",
    )
    p.add_argument("--kubeconfig", type=Path, help="default: $KUBECONFIG, ~/.kube/config")
    add_output_argument(p)
    p.set_defaults(handler=cmd_explain)


# -- where the rules come from -------------------------------------------------------------


def _read_document_file(path: Path) -> PolicyDocument:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from exc
    except (yaml.YAMLError, RecursionError) as exc:
        raise CliError(f"{path} is neither JSON nor YAML: {exc}") from exc
    return _parse(raw, str(path))


def _parse(raw: Any, where: str) -> PolicyDocument:
    try:
        return parse_policy_document(raw, "policy")
    except FieldError as exc:
        raise CliError(f"{where}: {exc}") from exc


def _rule(text: str) -> CallerRule:
    kind, _, spiffe_id = text.partition(":")
    return CallerRule(SpiffeId(spiffe_id), kind == "prefix")


def _sidecar_authorizer(address: str) -> tuple[Authorizer, TrustDomain | None]:
    """The rules a running sidecar enforces, rebuilt from the strings its /config shows
    (``exact:ID`` / ``prefix:ID``, ``CallerRule.__str__``)."""
    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    config = fetch_json(host, port, "/config")
    policy = (config.get("inbound") or {}).get("policy") or {}
    try:
        per_port = {
            int(p): tuple(_rule(r) for r in rules)
            for p, rules in (policy.get("ports") or {}).items()
        }
        any_raw = policy.get("any_port")
        any_port = None if any_raw is None else tuple(_rule(r) for r in any_raw)
        # Where each port's rules come from ("AccessPolicy ledger", "inbound.targets.8080
        # .allow"); a sidecar older than these keys names none, and explain then says
        # "the rules for port N".
        sources = {
            int(p): tuple(str(name) for name in names)
            for p, names in (policy.get("sources") or {}).items()
        }
        any_port_sources = tuple(str(name) for name in policy.get("any_port_sources") or ())
        own = (config.get("identity") or {}).get("spiffe_id")
        trust_domain = SpiffeId(own).trust_domain if own else None
    except (SpiffeIdError, ValueError, TypeError, AttributeError) as exc:
        raise CliError(f"{address}/config holds a policy this command cannot read: {exc}") from exc
    return Authorizer(per_port, any_port, sources, any_port_sources), trust_domain


# -- the explanation -----------------------------------------------------------------------


def _policies_for(
    document: PolicyDocument | None, labels: Mapping[str, str], port: int, caller: SpiffeId
) -> list[dict[str, Any]]:
    if document is None:
        return []
    return [
        {
            "name": policy.name,
            "ports": list(policy.ports),
            "rules": [{"rule": str(r), "matches": r.allows(caller)} for r in policy.allow],
        }
        for policy in document.selecting(labels)
        if not policy.ports or port in policy.ports
    ]


def _where(sources: list[str], port: int) -> str:
    """The places a caller's rule could go, from the names a sidecar gives its sources."""
    policies = [s.removeprefix("AccessPolicy ") for s in sources if s.startswith("AccessPolicy ")]
    places = [f"AccessPolicy {', '.join(policies)}"] if policies else []
    places += [f"the sidecar config's {s}" for s in sources if not s.startswith("AccessPolicy ")]
    if not places:
        return (
            f"the rules for port {port} (an AccessPolicy selecting the pod, or the sidecar"
            f" config's inbound.targets.{port}.allow)"
        )
    return " or ".join(places)


def _fix(
    allowed: bool,
    rules: tuple[CallerRule, ...] | None,
    caller: SpiffeId,
    port: int,
    policies: list[dict[str, Any]],
    sources: list[str],
) -> str | None:
    if allowed:
        return None
    add = f"{{exact: {caller}}}"
    if rules is None:
        return (
            f"a caller from {caller.trust_domain} needs a rule: add an AccessPolicy for port"
            f" {port} selecting this pod that allows {add} (and federate the trust domains)"
        )
    named = [p["name"] for p in policies if p["name"]]
    where = f"AccessPolicy {', '.join(named)}" if named else _where(sources, port)
    if not rules:
        return f"{where} allows nobody on port {port} (empty allow): add {add} to its allow list"
    return f"add {add} to the allow list of {where}"


def explain(
    authorizer: Authorizer,
    caller: SpiffeId,
    port: int,
    own_trust_domain: TrustDomain | None,
    document: PolicyDocument | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The verdict of ``decide`` with the policies and rules behind it, as a document."""
    decision = authorizer.decide(caller, port, own_trust_domain)
    rules = authorizer.rules_for(port)
    policies = _policies_for(document, labels or {}, port, caller)
    matched = next((str(r) for r in rules or () if r.allows(caller)), None)
    # The names the sidecar itself gives the sources of this port's rules.
    sources = list(authorizer.sources.get(port, ())) if port in authorizer.per_port else []
    if authorizer.any_port is not None:
        sources += authorizer.any_port_sources
    sources = list(dict.fromkeys(sources))
    return {
        "caller": str(caller),
        "port": port,
        "trust_domain": None if own_trust_domain is None else own_trust_domain.name,
        "allowed": decision.allowed,
        "reason": decision.reason,
        # As the sidecar names it in its access log and a refused HTTP caller's 403.
        "decided_by": decision.rule,
        "rule": matched if decision.allowed else None,
        "policies": policies,
        "rules": None if rules is None else [str(r) for r in rules],
        "sources": None if rules is None else sources,
        "fix": _fix(decision.allowed, rules, caller, port, policies, sources),
    }


def _text(document: dict[str, Any]) -> Iterator[str]:
    verdict = "ALLOWED" if document["allowed"] else "DENIED"
    yield f"{verdict}: {document['caller']} on port {document['port']}"
    yield f"  reason: {document['reason']}"
    yield f"  decided by: {document['decided_by']}"
    if document["rules"] is None:
        yield f"  no policy covers port {document['port']}: the mesh default applies"
    for policy in document["policies"]:
        ports = ", ".join(str(p) for p in policy["ports"]) or "every port"
        yield f"  AccessPolicy {policy['name'] or '(unnamed)'} ({ports}):"
        if not policy["rules"]:
            yield "    allows nobody"
        for rule in policy["rules"]:
            yield f"    {'matches' if rule['matches'] else 'no match'}  {rule['rule']}"
    if not document["policies"] and document["rules"] is not None:
        yield f"  rules for port {document['port']}:" if document["rules"] else "  allows nobody"
        for rule in document["rules"]:
            matches = rule == document["rule"]
            yield f"    {'matches' if matches else 'no match'}  {rule}"
    if document["fix"]:
        yield f"  fix: {document['fix']}"


def cmd_explain(args: argparse.Namespace) -> int:
    document: PolicyDocument | None = None
    labels: dict[str, str] = dict(args.labels)
    if args.pod is not None and args.namespace is None:
        raise CliError("--pod needs --namespace (the pod's labels are read through the API)")
    if args.sidecar is not None:
        authorizer, sidecar_td = _sidecar_authorizer(args.sidecar)
        trust_domain = args.trust_domain or sidecar_td
    else:
        if args.policy is not None:
            document = _read_document_file(args.policy)
        else:
            from trellis.diagnose.kube import api_client, read_pod_labels, read_policy_document

            api = api_client(args.kubeconfig)
            where = f"ConfigMap {args.namespace}/trellis-policy"
            document = _parse(read_policy_document(api, args.namespace), where)
            if args.pod is not None:
                labels = read_pod_labels(api, args.namespace, args.pod)
        authorizer = authorizer_for_pod(document, labels)
        trust_domain = args.trust_domain or document.trust_domain
    result = explain(authorizer, args.caller, args.port, trust_domain, document, labels)
    emit(result, args.output, _text)
    return 0 if result["allowed"] else 1
