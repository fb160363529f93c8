"""Transparent mode for real: a network namespace of our own (loopback only), the rules from
`trellis sidecar iptables`, and an app that dials its peer's address directly.

Inside the namespace 127.0.0.2 plays the remote pod: its echo app on :18080 and its sidecar
(B) on :15008. The local sidecar (A) listens on 127.0.0.1:15001 and dials <original
IP>:15008. The app runs as UID 65534; the sidecars as root, which is the proxy UID the
rules exempt (what 1337 is in a pod). The IPv6 case does the same with fd00::2 as the
remote pod (added to the namespace's loopback) and the rules from ip6tables.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from .conftest import CLIENT, ECHO
from .harness import ECHO as ECHO_APP
from .harness import Pki, Procs, wait_for

CLIENT_SCRIPT = """
import socket, sys
payload = sys.argv[1].encode() * 1000
host = sys.argv[2]
with socket.create_connection((host, 18080), timeout=10) as s:
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
print("echoed" if data == payload else f"mismatch {len(data)}")
"""


@pytest.fixture
def netns() -> Iterator[str]:
    if shutil.which("iptables") is None or shutil.which("ip6tables") is None:
        pytest.fail("iptables/ip6tables are not installed (Debian package iptables)")
    name = f"trellis-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _in(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _curl(ns: str, url: str) -> str:
    code = (
        f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    )
    return subprocess.run(
        _in(ns, sys.executable, "-c", code),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout


@dataclass(frozen=True)
class Family:
    """Where the remote pod sits, and which tool's rules must hold the redirect."""

    remote: str  # the remote pod's address, on the namespace's loopback
    tool: str  # iptables or ip6tables
    inbound: str  # sidecar B's inbound listen address

    @property
    def app_host(self) -> str:
        return f"[{self.remote}]" if ":" in self.remote else self.remote


IPV4 = Family("127.0.0.2", "iptables", "127.0.0.2:15008")
# ip6tables' REDIRECT of a local connection delivers to ::1, where sidecar A's transparent
# listener has its IPv6 twin.
IPV6 = Family("fd00::2", "ip6tables", "[fd00::2]:15008")


@pytest.mark.parametrize("family", [IPV4, IPV6], ids=["ipv4", "ipv6"])
def test_a_redirected_app_connection_reaches_the_peer_via_its_original_destination(
    netns: str, procs: Procs, pki: Pki, family: Family
) -> None:
    # `netns` first: fixtures tear down in reverse, so the processes stop before it goes.
    work = procs.workdir
    if family is IPV6:
        subprocess.run(
            _in(netns, "ip", "-6", "addr", "add", f"{family.remote}/128", "dev", "lo", "nodad"),
            check=True,
        )
    rules = subprocess.run(
        _in(
            netns, sys.executable, "-m", "trellis", "sidecar", "iptables", "--proxy-uid=0",
            "--outbound-port=15001", "--inbound-port=15008", "--exclude-inbound-ports=15000",
        ),
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "PYTHONPATH": str(ECHO_APP.parents[3])},
    )  # fmt: skip
    # Both tools got the rules: no warning about IPv6 left uncaptured.
    assert rules.returncode == 0 and "warning" not in rules.stderr, rules.stderr
    listed = subprocess.run(
        _in(netns, family.tool, "-t", "nat", "-S"), capture_output=True, text=True, check=True
    ).stdout
    assert "-A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in listed

    procs.start("echo", _in(netns, sys.executable, str(ECHO_APP), "18080", family.remote))
    configs = {
        "b": {
            "svid_dir": str(pki.write(work / "svid-b", ECHO)),
            "admin": "127.0.0.2:15000",
            "inbound": {
                "listen": family.inbound,
                # The app's port, declared: B forwards nothing else.
                "targets": {18080: {"app": f"{family.app_host}:18080"}},
            },
        },
        "a": {
            "mode": "transparent",
            "svid_dir": str(pki.write(work / "svid-a", CLIENT)),
            "admin": "127.0.0.1:15000",
            "outbound": "127.0.0.1:15001",
            "inbound": {"listen": "127.0.0.1:15008"},
        },
    }
    for name, config in configs.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        procs.start(
            f"sidecar-{name}",
            _in(netns, sys.executable, "-m", "trellis", "sidecar", "--config", str(path)),
        )

    def ready() -> bool:
        try:
            return all(
                _curl(netns, f"http://{host}:15000/readyz").strip() == "ready"
                for host in ("127.0.0.1", "127.0.0.2")
            )
        except subprocess.CalledProcessError:
            return False

    wait_for(ready, 30, "both sidecars ready in the namespace")
    client = subprocess.run(
        _in(
            netns, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            sys.executable, "-c", CLIENT_SCRIPT, "transparent", family.remote,
        ),
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert client.stdout.strip() == "echoed", client.stderr
    a = _curl(netns, "http://127.0.0.1:15000/metrics")
    assert 'trellis_sidecar_streams_total{direction="outbound",outcome="ok"} 1.0' in a
    b = _curl(netns, "http://127.0.0.2:15000/metrics")
    assert 'trellis_sidecar_policy_decisions_total{decision="allow"} 1.0' in b
    pools = _curl(netns, "http://127.0.0.1:15000/config")
    assert family.inbound in pools  # dialled the original destination's sidecar
