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
    done = _exec_plugin(command, stdin, netns_path=netns_path, cni_args=cni_args)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {})


def _exec_plugin(
    command: str,
    stdin: str,
    *,
    netns_path: str = "",
    cni_args: str = "",
    interpreter_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
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
    return subprocess.run(
        [sys.executable, *interpreter_args, "-m", "sidecar.cni"],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


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


# -- reading the pod from the API server ----------------------------------------------------


class _ApiServer:
    """A TLS server on loopback standing in for the API server's one GET (a real
    kube-apiserver runs in tests/kube; here each test picks the answer, including ones a
    real server never sends). Serves at most ``connections`` connections, then stops."""

    def __init__(self, tmp: Path, answer: Any, connections: int = 1) -> None:
        import socket
        import ssl
        import threading

        from tests.ca.server.test_psat import _self_signed

        cert, key, self.ca_pem = _self_signed(tmp)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(30)
        self.port: int = self._listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.sent = 0
        self._answer = answer
        self._thread = threading.Thread(target=self._serve, args=(connections,), daemon=True)
        self._thread.start()

    def _serve(self, connections: int) -> None:
        import contextlib

        for _ in range(connections):
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), raw:
                self._answer(self, raw)

    def tls(self, raw: Any) -> Any:
        """The connection after the handshake, with the request read and noted."""
        tls = self._context.wrap_socket(raw, server_side=True)
        tls.settimeout(20)
        request = b""
        for _ in range(64):  # bounded: a GET is well under 64 reads
            chunk = tls.recv(4096)
            request += chunk
            if not chunk or b"\r\n\r\n" in request:
                break
        self.requests.append(request)
        return tls

    def kubeconfig(self, tmp: Path, token: str = "sa-token") -> Path:
        from sidecar.cni import render_kubeconfig

        path = tmp / "trellis-cni.kubeconfig"
        path.write_text(render_kubeconfig(f"https://127.0.0.1:{self.port}", self.ca_pem, token))
        return path

    def close(self) -> None:
        self._listener.close()
        self._thread.join(timeout=30)


def _answer_pod(annotations: dict[str, str], status: int = 200) -> Any:
    def answer(server: _ApiServer, raw: Any) -> None:
        tls = server.tls(raw)
        if status == 200:
            body = json.dumps(
                {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": {"name": "web-0", "namespace": "shop", "annotations": annotations},
                }
            ).encode()
        else:
            body = json.dumps({"kind": "Status", "message": 'pods "web-0" not found'}).encode()
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        tls.sendall(head.encode() + body)
        tls.close()

    return answer


POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"


def test_add_reads_the_pod_with_one_https_get_and_never_imports_the_kubernetes_client(
    netns: str, tmp_path: Path
) -> None:
    """The GET carries the ServiceAccount token and asks for the pod's metadata only; the
    pod marked for the CNI redirect gets it. Importing the Kubernetes client was most of
    every ADD's time (a median 1.38 s ADD became 0.17 s on a 2-core machine); before the
    fix it was imported here."""
    server = _ApiServer(tmp_path, _answer_pod({"trellis.dev/redirect": "cni"}))
    try:
        config = json.dumps(_config(redirectAll=False, kubeconfig=str(server.kubeconfig(tmp_path))))
        done = _exec_plugin(
            "ADD",
            config,
            netns_path=_path(netns),
            cni_args=POD_ARGS,
            interpreter_args=("-X", "importtime"),
        )
    finally:
        server.close()
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout) == PREV_RESULT
    assert "-j REDIRECT --to-ports 15008" in _nat(netns)
    # -X importtime: one stderr line per module imported, its dotted name last.
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert not any(name.split(".")[0] == "kubernetes" for name in imported)
    (request,) = server.requests
    head = request.decode().lower()
    assert head.startswith("get /api/v1/namespaces/shop/pods/web-0 http/1.1\r\n")
    assert "authorization: bearer sa-token\r\n" in head
    assert "as=partialobjectmetadata" in head


def test_a_pod_without_the_cni_mark_is_passed_through_untouched(netns: str, tmp_path: Path) -> None:
    server = _ApiServer(tmp_path, _answer_pod({"other": "x"}))
    try:
        config = json.dumps(_config(redirectAll=False, kubeconfig=str(server.kubeconfig(tmp_path))))
        code, result = _plugin("ADD", config, netns_path=_path(netns), cni_args=POD_ARGS)
    finally:
        server.close()
    assert (code, result) == (0, PREV_RESULT)
    assert "TRELLIS" not in _nat(netns)


def test_a_missing_pod_is_a_try_again_error_naming_the_api_servers_message(
    netns: str, tmp_path: Path
) -> None:
    server = _ApiServer(tmp_path, _answer_pod({}, status=404))
    try:
        config = json.dumps(_config(redirectAll=False, kubeconfig=str(server.kubeconfig(tmp_path))))
        code, error = _plugin("ADD", config, netns_path=_path(netns), cni_args=POD_ARGS)
    finally:
        server.close()
    assert code != 0 and error["code"] == 11, error  # SPEC.md: "Try again later"
    assert "HTTP 404" in error["msg"] and "not found" in error["details"]
    assert "TRELLIS" not in _nat(netns)


def test_an_endless_answer_is_refused_at_the_size_limit_not_read_to_its_end(
    netns: str, tmp_path: Path
) -> None:
    """The server streams a body without end (chunked, up to 256 MiB): the plugin stops
    reading at its limit and says so. Before the fix the Kubernetes client read all of it
    into memory and the plugin died with a traceback when the stream ended."""
    from sidecar.podannotations import MAX_ANSWER

    def endless(server: _ApiServer, raw: Any) -> None:
        tls = server.tls(raw)
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        tls.sendall(b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b'{"metadata": {"annotations": {"a": "' + b"x" * 65536
        piece = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        for _ in range(4096):  # 256 MiB at most
            tls.sendall(piece)
            server.sent += len(chunk)

    server = _ApiServer(tmp_path, endless)
    try:
        config = json.dumps(_config(redirectAll=False, kubeconfig=str(server.kubeconfig(tmp_path))))
        code, error = _plugin("ADD", config, netns_path=_path(netns), cni_args=POD_ARGS)
    finally:
        server.close()
    assert code != 0 and error["code"] == 11, error
    assert f"exceeds {MAX_ANSWER} bytes" in error["msg"]
    # What the socket buffers took beyond the limit, far from the whole stream.
    assert server.sent < MAX_ANSWER + 32 * 1024 * 1024


def test_an_unusable_kubeconfig_is_an_io_error_in_one_line(netns: str, tmp_path: Path) -> None:
    for text in ("{", json.dumps({"clusters": [], "contexts": [], "users": []})):
        (tmp_path / "bad.kubeconfig").write_text(text)
        config = json.dumps(_config(redirectAll=False, kubeconfig=str(tmp_path / "bad.kubeconfig")))
        code, error = _plugin("ADD", config, netns_path=_path(netns), cni_args=POD_ARGS)
        assert code != 0 and error["code"] == 5, error
        assert "kubeconfig" in error["msg"] and "\n" not in error["msg"]
