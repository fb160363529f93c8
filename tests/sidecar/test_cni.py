"""The ``trellis-cni`` chained plugin, called exactly as a container runtime calls it.

Each test execs the plugin as a separate process with the CNI environment
(``CNI_COMMAND``, ``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS``,
``CNI_PATH``) and the network configuration on stdin, in a network namespace the test
creates (``ip netns add``), and reads the rules back with ``ip netns exec NS iptables -t nat
-S``: what libcni's ``ExecPluginWithResult`` does, without the runtime around it. (The
spec's own ``cnitool`` needs a whole conflist and bin dir and adds nothing a runtime would
not; the harness is that call, made directly.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

PREV_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:00:07", "sandbox": "/var/run/netns/x"}],
    "ips": [{"address": "10.244.0.7/24", "gateway": "10.244.0.1", "interface": 0}],
    "dns": {"nameservers": ["10.96.0.10"]},
}


def _config(**extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "trellis-cni",
        "redirectAll": True,
        "prevResult": PREV_RESULT,
        **extra,
    }


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("iptables") is None:
        pytest.fail("iptables is not installed (Debian package iptables)")
    name = f"trellis-cni-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _plugin(
    command: str, stdin: str, *, netns_path: str = "", cni_args: str = ""
) -> tuple[int, dict[str, Any]]:
    """One exec of the plugin, as the runtime makes it; returns (exit code, stdout JSON)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": str(REPO),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": netns_path,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": cni_args,
    }
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.cni"],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {})


def _nat(ns: str, tool: str = "iptables") -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, tool, "-t", "nat", "-S"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _path(ns: str) -> str:
    return f"/var/run/netns/{ns}"


def test_add_installs_the_redirect_in_the_pods_netns_and_passes_prev_result_through(
    netns: str,
) -> None:
    code, result = _plugin("ADD", json.dumps(_config()), netns_path=_path(netns))
    assert code == 0, result
    # SPEC.md "Chained plugins": the result is the previous plugin's, unchanged.
    assert result == PREV_RESULT
    listed = _nat(netns)
    assert "-A OUTPUT -p tcp -j TRELLIS_OUTPUT" in listed
    assert "-A PREROUTING -p tcp -j TRELLIS_INBOUND" in listed
    assert "-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN" in listed
    assert "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in listed
    assert "-A TRELLIS_INBOUND -p tcp -m tcp --dport 15020 -j RETURN" in listed
    assert "-A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 15008" in listed
    if shutil.which("ip6tables") is not None:
        assert "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in _nat(netns, "ip6tables")


def test_an_app_connection_in_the_pod_lands_on_the_outbound_port_with_its_original_destination(
    netns: str,
) -> None:
    # The pod's eth0 as the main plugin would leave it: an address and a default route (a
    # veth pair with both ends in the pod, so nothing leaves the namespace).
    for argv in (
        ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "veth-peer"],
        ["ip", "addr", "add", "10.244.0.7/24", "dev", "eth0"],
        ["ip", "link", "set", "eth0", "up"],
        ["ip", "route", "add", "default", "dev", "eth0"],
    ):
        subprocess.run(["ip", "netns", "exec", netns, *argv], check=True)
    assert _plugin("ADD", json.dumps(_config()), netns_path=_path(netns))[0] == 0
    # In the pod: a listener on the outbound port stands in for the sidecar; the "app" (UID 0,
    # not the proxy's 1337) dials an address outside the pod, which nothing routes.
    code = (
        "import socket, struct\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 15001)); srv.listen(1)\n"
        "app = socket.create_connection(('10.9.8.7', 8080), timeout=5)\n"
        "conn, _ = srv.accept()\n"
        "raw = conn.getsockopt(socket.SOL_IP, 80, 16)\n"  # SO_ORIGINAL_DST
        "port, = struct.unpack('!H', raw[2:4])\n"
        "print(socket.inet_ntoa(raw[4:8]), port)\n"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.stdout.split() == ["10.9.8.7", "8080"], done.stderr


def test_add_twice_leaves_exactly_one_jump_per_hook(netns: str) -> None:
    for _ in range(2):
        assert _plugin("ADD", json.dumps(_config()), netns_path=_path(netns))[0] == 0
    listed = _nat(netns)
    assert listed.count("-A OUTPUT -p tcp -j TRELLIS_OUTPUT") == 1
    assert listed.count("-A PREROUTING -p tcp -j TRELLIS_INBOUND") == 1


def test_check_passes_after_add_and_fails_with_a_cni_error_once_a_rule_is_gone(
    netns: str,
) -> None:
    config = json.dumps(_config())
    assert _plugin("ADD", config, netns_path=_path(netns))[0] == 0
    assert _plugin("CHECK", config, netns_path=_path(netns)) == (0, {})
    subprocess.run(
        ["ip", "netns", "exec", netns, "iptables", "-t", "nat", "-F", "TRELLIS_OUTPUT"],
        check=True,
    )
    code, error = _plugin("CHECK", config, netns_path=_path(netns))
    assert code != 0
    assert error["code"] == 101 and "redirect rule missing" in error["msg"]
    assert error["cniVersion"] == "1.0.0"


def test_del_removes_the_rules_and_is_idempotent(netns: str) -> None:
    config = json.dumps(_config())
    assert _plugin("ADD", config, netns_path=_path(netns))[0] == 0
    assert _plugin("DEL", config, netns_path=_path(netns)) == (0, {})
    assert "TRELLIS" not in _nat(netns)
    assert _plugin("DEL", config, netns_path=_path(netns)) == (0, {})


def test_del_succeeds_when_the_netns_is_already_gone() -> None:
    # SPEC.md: DEL must succeed even when resources are gone (the runtime may retry).
    code, out = _plugin("DEL", json.dumps(_config()), netns_path="/var/run/netns/trellis-gone")
    assert (code, out) == (0, {})
    assert _plugin("DEL", json.dumps(_config()), netns_path="")[0] == 0


def test_add_into_a_missing_netns_is_a_cni_error() -> None:
    code, error = _plugin("ADD", json.dumps(_config()), netns_path="/var/run/netns/trellis-gone")
    assert code != 0
    assert error["code"] == 4 and "does not exist" in error["msg"]


@pytest.mark.parametrize(
    ("stdin", "code", "words"),
    [
        ("{not json", 6, "not JSON"),
        ("[1, 2]", 6, "not a JSON object"),
        (json.dumps({"name": "x", "type": "trellis-cni"}), 7, "cniVersion is missing"),
        (json.dumps(_config(cniVersion="0.1.0")), 1, "not supported"),
        (json.dumps(_config(outboundPort=99999)), 7, "outboundPort"),
        (json.dumps(_config(excludeInboundPorts="15020")), 7, "excludeInboundPorts"),
        (json.dumps(_config(prevResult=[1])), 7, "prevResult"),
    ],
    ids=["not-json", "not-object", "no-version", "old-version", "bad-port", "bad-list", "bad-prev"],
)
def test_bad_config_is_a_cni_error_on_stdout_and_touches_nothing(
    netns: str, stdin: str, code: int, words: str
) -> None:
    rc, error = _plugin("ADD", stdin, netns_path=_path(netns))
    assert rc != 0
    assert error["code"] == code and words in error["msg"]
    assert set(error) == {"cniVersion", "code", "msg", "details"}
    assert "TRELLIS" not in _nat(netns)


def test_version_reports_the_spec_versions_it_speaks() -> None:
    code, out = _plugin("VERSION", "")
    assert code == 0
    assert out["cniVersion"] == "1.1.0"
    assert {"0.4.0", "1.0.0", "1.1.0"} <= set(out["supportedVersions"])


def test_an_unknown_command_is_a_cni_error() -> None:
    code, error = _plugin("GC", json.dumps(_config()))
    assert code != 0 and error["code"] == 4


def test_without_redirect_all_or_a_kubeconfig_the_plugin_passes_through_and_touches_nothing(
    netns: str,
) -> None:
    config = json.dumps(_config(redirectAll=False))
    cni_args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"
    code, result = _plugin("ADD", config, netns_path=_path(netns), cni_args=cni_args)
    assert (code, result) == (0, PREV_RESULT)
    assert "TRELLIS" not in _nat(netns)


@pytest.mark.parametrize(
    ("host", "server"),
    [
        ("fd00:10:96::1", "https://[fd00:10:96::1]:443"),
        ("10.96.0.1", "https://10.96.0.1:443"),
    ],
)
def test_the_plugins_kubeconfig_brackets_an_ipv6_api_server_address(
    tmp_path: Path, host: str, server: str
) -> None:
    """``trellis-cni kubeconfig`` as the DaemonSet runs it, from the in-cluster environment
    and a ServiceAccount folder; the Kubernetes client's own loader reads the file back. An
    IPv6 ``KUBERNETES_SERVICE_HOST`` written unbracketed (``https://fd00:10:96::1:443``, what
    the DaemonSet's shell used to write) is a URL whose port is ``:1:443``."""
    from kubernetes import client, config

    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(
        b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    )
    (account / "token").write_text("a-projected-token\n")
    target = tmp_path / "trellis-cni.kubeconfig"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": "443",
    }
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.cni", "kubeconfig", f"--out={target}",
         f"--service-account-dir={account}"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert target.stat().st_mode & 0o777 == 0o600
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(target), client_configuration=configuration)  # type: ignore[no-untyped-call]
    assert configuration.host == server
    assert "a-projected-token" in str(configuration.api_key)

    # The DaemonSet writes it with this command and builds no API server URL of its own.
    daemonset = (REPO / "manifests" / "cni" / "daemonset.yaml").read_text()
    assert "--out=/host/etc/cni/net.d/trellis-cni.kubeconfig" in daemonset
    assert "KUBERNETES_SERVICE_HOST" not in daemonset


def test_the_plugins_kubeconfig_is_refused_in_one_line_without_the_in_cluster_address(
    tmp_path: Path,
) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "sidecar.cni", "kubeconfig", f"--out={tmp_path / 'k'}",
         f"--service-account-dir={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("trellis-cni kubeconfig: KUBERNETES_SERVICE_HOST")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "k").exists()
