"""``trellis-cni``: a chained CNI plugin that installs the pod's redirect in its netns.

Injected pods of the CNI mode carry no ``trellis-init`` container with NET_ADMIN/NET_RAW
(what Pod Security "baseline" refuses); the container runtime runs this plugin, as root on
the node, after the pod's network is set up, and it installs the same rules
``trellis sidecar iptables`` would (``sidecar.iptables.plan``) inside the pod's network
namespace.

The CNI spec (containernetworking/cni SPEC.md) fixes the calling convention:

* the network configuration is JSON on stdin; a chained plugin finds the previous plugin's
  result in ``prevResult`` and must print it back unchanged on ADD (§ "Chained plugins");
* ``CNI_COMMAND`` is ADD, CHECK, DEL or VERSION; ``CNI_NETNS`` the path of the namespace;
  ``CNI_CONTAINERID`` and ``CNI_IFNAME`` identify the attachment; ``CNI_ARGS`` carries
  ``K8S_POD_NAMESPACE=...;K8S_POD_NAME=...`` from Kubernetes runtimes;
* an error is ``{"cniVersion", "code", "msg", "details"}`` on stdout with a non-zero exit
  (codes 1-99 are the spec's own, 100 and up the plugin's);
* DEL must succeed when the namespace is already gone, and when called twice.

Plugin configuration (keys beside ``name``/``type``/``cniVersion``): ``proxyUid``,
``outboundPort``, ``inboundPort``, ``excludeInboundPorts``, ``excludeOutboundPorts`` (the
defaults are the injector's). Which pods get the redirect: the node's conflist runs the
plugin for every pod, so with ``"kubeconfig": PATH`` it reads the pod named by ``CNI_ARGS``
(``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``) from the API server and acts only when the
injector marked it ``trellis.dev/redirect: cni``; ``"redirectAll": true`` acts on every pod
(static mode: a node that runs only mesh workloads). With neither, the plugin passes the
result through and touches nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from core.errors import FieldError
from meshapi.redirect import RedirectAnnotations, parse_redirect_annotations

from . import iptables

__all__ = [
    "CniError",
    "PluginConfig",
    "api_server_url",
    "chain_into",
    "install",
    "main",
    "parse_config",
    "run",
    "write_kubeconfig",
]

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

# SPEC.md "Error": well-known error codes.
ERR_INCOMPATIBLE_VERSION = 1
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_POD_READ = 11  # SPEC.md: "Try again later" - the API server may answer next time
# Plugin-specific (100 and up): the redirect could not be installed or is not as planned.
ERR_REDIRECT_FAILED = 100
ERR_REDIRECT_MISSING = 101


class CniError(Exception):
    """Printed as the spec's error object; ``code`` follows SPEC.md's table."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


@dataclass(frozen=True, slots=True)
class PluginConfig:
    cni_version: str
    name: str
    proxy_uid: int = 1337
    outbound_port: int = 15001
    inbound_port: int = 15008
    exclude_inbound_ports: tuple[int, ...] = (15020,)
    exclude_outbound_ports: tuple[int, ...] = ()
    redirect_all: bool = False
    kubeconfig: str | None = None
    prev_result: Mapping[str, Any] | None = None


def _port(raw: Any, key: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 65535:
        raise CniError(ERR_INVALID_CONFIG, f"{key}: expected a port number 1-65535, got {raw!r}")
    return raw


def _ports(raw: Any, key: str) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise CniError(ERR_INVALID_CONFIG, f"{key}: expected a list of ports, got {raw!r}")
    return tuple(_port(p, key) for p in raw)


def parse_config(text: str) -> PluginConfig:
    """The network configuration from stdin, as a typed value; CniError if unusable."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CniError(ERR_DECODE, "network configuration is not JSON", str(exc)) from exc
    if not isinstance(raw, dict):
        raise CniError(ERR_DECODE, "network configuration is not a JSON object")
    version = raw.get("cniVersion")
    if not isinstance(version, str):
        raise CniError(ERR_INVALID_CONFIG, "cniVersion is missing")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            "supported: " + ", ".join(SUPPORTED_VERSIONS),
        )
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise CniError(ERR_INVALID_CONFIG, "name is missing")
    uid = raw.get("proxyUid", 1337)
    if isinstance(uid, bool) or not isinstance(uid, int) or uid < 0:
        raise CniError(ERR_INVALID_CONFIG, f"proxyUid: expected a UID, got {uid!r}")
    prev = raw.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(ERR_INVALID_CONFIG, "prevResult: expected an object")
    redirect_all = raw.get("redirectAll", False)
    if not isinstance(redirect_all, bool):
        raise CniError(ERR_INVALID_CONFIG, "redirectAll: expected true or false")
    kubeconfig = raw.get("kubeconfig")
    if kubeconfig is not None and (not isinstance(kubeconfig, str) or not kubeconfig):
        raise CniError(ERR_INVALID_CONFIG, "kubeconfig: expected a file path")
    return PluginConfig(
        cni_version=version,
        name=name,
        proxy_uid=uid,
        outbound_port=_port(raw.get("outboundPort", 15001), "outboundPort"),
        inbound_port=_port(raw.get("inboundPort", 15008), "inboundPort"),
        exclude_inbound_ports=_ports(
            raw.get("excludeInboundPorts", [15020]), "excludeInboundPorts"
        ),
        exclude_outbound_ports=_ports(raw.get("excludeOutboundPorts", []), "excludeOutboundPorts"),
        redirect_all=redirect_all,
        kubeconfig=kubeconfig,
        prev_result=prev,
    )


def _cni_args(env: Mapping[str, str]) -> dict[str, str]:
    # SPEC.md: CNI_ARGS is "FOO=BAR;ABC=123".
    out: dict[str, str] = {}
    for item in env.get("CNI_ARGS", "").split(";"):
        key, sep, value = item.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _binaries() -> list[str]:
    found = [b for b in ("iptables", "ip6tables") if shutil.which(b) is not None]
    if "iptables" not in found:
        raise CniError(ERR_REDIRECT_FAILED, "iptables not found on the node")
    return found


def _in_netns(netns: str, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net={netns}", *argv], capture_output=True, text=True, check=False
    )


def _plan(config: PluginConfig, pod: RedirectAnnotations, binary: str) -> list[list[str]]:
    """The plugin's own exclusions plus the pod's annotations, for one tool's family."""
    return iptables.plan(
        proxy_uid=config.proxy_uid,
        outbound_port=config.outbound_port,
        inbound_port=config.inbound_port,
        exclude_inbound_ports=tuple(
            dict.fromkeys(config.exclude_inbound_ports + pod.exclude_inbound_ports)
        ),
        exclude_outbound_ports=tuple(
            dict.fromkeys(config.exclude_outbound_ports + pod.exclude_outbound_ports)
        ),
        exclude_outbound_ranges=pod.exclude_outbound_ranges,
        include_outbound_ranges=pod.include_outbound_ranges,
        family=6 if binary == "ip6tables" else 4,
    )


def _unhook(netns: str, binary: str) -> None:
    hooks = (("OUTPUT", iptables.OUT_CHAIN), ("PREROUTING", iptables.IN_CHAIN))
    for hook, chain in hooks:
        # Bounded: one jump per hook is what ADD installs; a few more are left by reruns.
        for _ in range(16):
            rule = [binary, "-t", "nat", "-D", hook, "-p", "tcp", "-j", chain]
            if _in_netns(netns, rule).returncode != 0:
                break


def _add(config: PluginConfig, pod: RedirectAnnotations, netns: str) -> None:
    for binary in _binaries():
        _unhook(netns, binary)
        for rule in _plan(config, pod, binary):
            result = _in_netns(netns, [binary, *rule])
            if result.returncode != 0:
                if "-N" in rule and "exists" in result.stderr:
                    continue
                raise CniError(
                    ERR_REDIRECT_FAILED,
                    f"{binary} {' '.join(rule)} failed in {netns}",
                    result.stderr.strip(),
                )


def _check(config: PluginConfig, pod: RedirectAnnotations, netns: str) -> None:
    for binary in _binaries():
        for rule in _plan(config, pod, binary):
            if "-A" not in rule:
                continue
            probe = ["-C" if part == "-A" else part for part in rule]
            if _in_netns(netns, [binary, *probe]).returncode != 0:
                raise CniError(
                    ERR_REDIRECT_MISSING,
                    f"redirect rule missing in {netns}: {binary} {' '.join(rule)}",
                )


def _delete(netns: str) -> None:
    for binary in _binaries():
        _unhook(netns, binary)
        for chain in (iptables.OUT_CHAIN, iptables.IN_CHAIN):
            _in_netns(netns, [binary, "-t", "nat", "-F", chain])
            _in_netns(netns, [binary, "-t", "nat", "-X", chain])


ANNOTATION_REDIRECT = "trellis.dev/redirect"


def _pod_annotations(kubeconfig: str, namespace: str, name: str) -> Mapping[str, str]:
    # One HTTPS GET (sidecar.podannotations), not the Kubernetes client: importing that
    # was most of every ADD's time.
    from .podannotations import ApiReadError, load_kubeconfig, read_annotations

    try:
        return read_annotations(load_kubeconfig(kubeconfig), namespace, name, timeout=10.0)
    except ApiReadError as exc:
        if exc.config:
            raise CniError(ERR_IO, f"{exc.msg} ({kubeconfig})", exc.details) from None
        message = f"reading pod {namespace}/{name} failed: {exc.msg}"
        raise CniError(ERR_POD_READ, message, exc.details) from None


def _wanted(config: PluginConfig, env: Mapping[str, str]) -> RedirectAnnotations | None:
    """What to install for this pod (its redirect annotations, as the init container would
    have applied them), or None when the pod is not ours to redirect."""
    if config.redirect_all:
        return RedirectAnnotations()
    if config.kubeconfig is None:
        return None
    args = _cni_args(env)
    namespace, name = args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")
    if not namespace or not name:
        return None  # not a Kubernetes pod: nothing of ours to install
    annotations = _pod_annotations(config.kubeconfig, namespace, name)
    if annotations.get(ANNOTATION_REDIRECT) != "cni":
        return None
    try:
        # Checked at admission too; annotations can change before the pod is scheduled.
        return parse_redirect_annotations(annotations)
    except FieldError as exc:
        raise CniError(ERR_INVALID_CONFIG, f"pod {namespace}/{name}: {exc}") from exc


def run(env: Mapping[str, str], stdin: str) -> dict[str, Any]:
    """One plugin invocation: the result object to print, or CniError."""
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        return {"cniVersion": SUPPORTED_VERSIONS[-1], "supportedVersions": list(SUPPORTED_VERSIONS)}
    if command not in ("ADD", "CHECK", "DEL"):
        raise CniError(
            ERR_INVALID_ENV, f"CNI_COMMAND {command!r}: expected ADD, CHECK, DEL or VERSION"
        )
    config = parse_config(stdin)
    netns = env.get("CNI_NETNS", "")
    if command == "DEL":
        # SPEC.md: DEL must succeed when the namespace is gone, and when repeated.
        if netns and os.path.exists(netns):  # noqa: PTH110 - a path string from the runtime
            _delete(netns)
        return {}
    if not env.get("CNI_CONTAINERID"):
        raise CniError(ERR_INVALID_ENV, "CNI_CONTAINERID is missing")
    if not netns:
        raise CniError(ERR_INVALID_ENV, "CNI_NETNS is missing")
    if not os.path.exists(netns):  # noqa: PTH110
        raise CniError(ERR_INVALID_ENV, f"CNI_NETNS {netns} does not exist")
    pod = _wanted(config, env)
    if pod is not None:
        if command == "ADD":
            _add(config, pod, netns)
        else:
            _check(config, pod, netns)
    if command == "CHECK":
        return {}
    # SPEC.md "Chained plugins": a plugin that changes nothing passes prevResult through.
    if config.prev_result is not None:
        return dict(config.prev_result)
    return {"cniVersion": config.cni_version}


PLUGIN_TYPE = "trellis-cni"


def chain_into(conflist: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """``conflist`` with ``entry`` last in its ``plugins`` (a chained plugin runs after the
    main one and sees its result); an earlier trellis-cni entry is replaced, so reinstalling
    leaves one. The entry's ``cniVersion`` is the list's (libcni passes the list's on)."""
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list):
        raise ValueError("the network configuration list has no plugins list")
    kept = [p for p in plugins if not (isinstance(p, Mapping) and p.get("type") == PLUGIN_TYPE)]
    return {**conflist, "plugins": [*kept, {**entry, "type": PLUGIN_TYPE}]}


def install(conf_dir: Path, entry: Mapping[str, Any]) -> Path:
    """Chain ``entry`` into the node's network configuration: the first ``*.conflist`` in
    ``conf_dir`` by name, the one the runtime (libcni ``ConfFiles``, sorted) loads. Written
    to a temporary file and renamed, so the runtime never reads half a file."""
    lists = sorted(conf_dir.glob("*.conflist"))
    if not lists:
        raise FileNotFoundError(f"no *.conflist in {conf_dir}: is the main CNI plugin installed?")
    target = lists[0]
    current = json.loads(target.read_text(encoding="utf-8"))
    if not isinstance(current, dict):
        raise ValueError(f"{target} is not a JSON object")
    scratch = target.with_name(target.name + ".trellis-tmp")
    scratch.write_text(json.dumps(chain_into(current, entry), indent=2) + "\n", encoding="utf-8")
    scratch.replace(target)
    return target


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def api_server_url(host: str, port: str) -> str:
    """``https://HOST:PORT`` for the in-cluster API server; an IPv6 host is bracketed
    (RFC 3986 §3.2.2: an IP literal in a URI is enclosed in "[" and "]"), as client-go's
    ``InClusterConfig`` does with ``net.JoinHostPort``. On an IPv6 or dual-stack-first
    cluster ``KUBERNETES_SERVICE_HOST`` is such an address."""
    if not host or not port.isdigit():
        raise ValueError(
            "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must name the API server"
        )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"https://{host}:{port}"


def render_kubeconfig(server: str, ca_pem: bytes, token: str) -> str:
    """The plugin's kubeconfig: the DaemonSet's ServiceAccount, against ``server``."""
    import base64

    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "trellis-cni", "user": {"token": token.strip()}}],
        "contexts": [
            {"name": "trellis-cni", "context": {"cluster": "local", "user": "trellis-cni"}}
        ],
        "current-context": "trellis-cni",
    }
    return json.dumps(document, indent=2) + "\n"  # JSON is YAML: kubeconfig loaders read it


def write_kubeconfig(target: Path, env: Mapping[str, str], account_dir: Path) -> None:
    """Write the kubeconfig from the pod's ServiceAccount (token and CA) and the API
    server's in-cluster address, mode 0600 and by an atomic rename: the runtime may exec
    the plugin at any moment, and the token is a credential."""
    server = api_server_url(
        env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
    )
    text = render_kubeconfig(
        server, (account_dir / "ca.crt").read_bytes(), (account_dir / "token").read_text()
    )
    scratch = target.with_name(target.name + ".tmp")
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(text)
    scratch.replace(target)


def _kubeconfig_main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="trellis-cni kubeconfig",
        description="write the plugin's kubeconfig from this pod's ServiceAccount",
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--service-account-dir", type=Path, default=Path(SERVICE_ACCOUNT_DIR))
    args = parser.parse_args(argv)
    try:
        write_kubeconfig(args.out, os.environ, args.service_account_dir)
    except (OSError, ValueError) as exc:
        print(f"trellis-cni kubeconfig: {exc}", file=sys.stderr)
        return 1
    return 0


def _install_main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="trellis-cni install", description="chain trellis-cni into the node's conflist"
    )
    parser.add_argument("--cni-conf-dir", required=True)
    parser.add_argument("--entry", required=True, help="the plugin's configuration (JSON)")
    args = parser.parse_args(argv)
    try:
        entry = json.loads(args.entry)
        if not isinstance(entry, dict):
            raise ValueError("--entry: expected a JSON object")
        target = install(Path(args.cni_conf_dir), entry)
    except (OSError, ValueError) as exc:
        print(f"trellis-cni install: {exc}", file=sys.stderr)
        return 1
    print(f"trellis-cni chained into {target}")
    return 0


def main(
    env: Mapping[str, str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    if env is None and sys.argv[1:2] == ["install"]:
        return _install_main(sys.argv[2:])
    if env is None and sys.argv[1:2] == ["kubeconfig"]:
        return _kubeconfig_main(sys.argv[2:])
    env = os.environ if env is None else env
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    version = "1.0.0"
    try:
        text = stdin.read() if env.get("CNI_COMMAND") != "VERSION" else ""
        try:
            declared = json.loads(text).get("cniVersion") if text else None
            if isinstance(declared, str):
                version = declared
        except (json.JSONDecodeError, AttributeError):
            pass
        result = run(env, text)
    except CniError as exc:
        error = {"cniVersion": version, "code": exc.code, "msg": exc.msg, "details": exc.details}
        stdout.write(json.dumps(error) + "\n")
        return 1
    except OSError as exc:
        error = {"cniVersion": version, "code": ERR_IO, "msg": "I/O failure", "details": str(exc)}
        stdout.write(json.dumps(error) + "\n")
        return 1
    if result:
        stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
