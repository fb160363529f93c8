"""The transparent-mode redirect as data (the netns test runs it for real)."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from typing import Any

import pytest

from sidecar.config import Address
from sidecar.iptables import plan
from sidecar.listen import ipv6_twin, listen_if_ipv6
from trellis.cli import main


def test_the_plan_exempts_the_proxy_uid_and_excluded_ports_and_redirects_the_rest() -> None:
    rules = [" ".join(r) for r in plan(
        proxy_uid=1337, outbound_port=15001, inbound_port=15008,
        exclude_inbound_ports=[15000], exclude_outbound_ports=[5432],
    )]  # fmt: skip
    out = [r for r in rules if "-A TRELLIS_OUTPUT" in r]
    assert out == [
        "-t nat -A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-t nat -A TRELLIS_OUTPUT -p tcp --dport 5432 -j RETURN",
        "-t nat -A TRELLIS_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
    ]
    inbound = [r for r in rules if "-A TRELLIS_INBOUND" in r]
    assert inbound[-1] == "-t nat -A TRELLIS_INBOUND -p tcp -j REDIRECT --to-ports 15008"
    assert "-t nat -A TRELLIS_INBOUND -p tcp --dport 15000 -j RETURN" in inbound
    assert "-t nat -A TRELLIS_INBOUND -p tcp --dport 15008 -j RETURN" in inbound
    assert "-t nat -A OUTPUT -p tcp -j TRELLIS_OUTPUT" in rules


def test_inbound_capture_can_be_left_off() -> None:
    rules = plan(proxy_uid=0, outbound_port=15001, inbound_port=15008, capture_inbound=False)
    assert not any("PREROUTING" in r for r in rules)


def test_the_same_rules_go_to_ip6tables_unless_ipv6_is_off(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["sidecar", "iptables", "--proxy-uid=1337", "--dry-run"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    v4 = [line.removeprefix("iptables ") for line in lines if line.startswith("iptables ")]
    v6 = [line.removeprefix("ip6tables ") for line in lines if line.startswith("ip6tables ")]
    assert v4 and v4 == v6
    assert main([*argv, "--ipv6=off"]) == 0
    assert "ip6tables" not in capsys.readouterr().out


def test_without_ip6tables_auto_warns_and_on_refuses(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name == "ip6tables" else real(name)
    )
    argv = ["sidecar", "iptables", "--proxy-uid=1337", "--dry-run"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "ip6tables" not in captured.out
    assert "IPv6 connections will not be captured" in captured.err
    # --ipv6 on: refused before any rule is printed or applied.
    assert main([*argv, "--ipv6=on"]) == 1
    captured = capsys.readouterr()
    assert "ip6tables not found" in captured.err and captured.out == ""


def test_ipv6_twins_are_where_ip6tables_redirects() -> None:
    assert ipv6_twin(Address("127.0.0.1", 15001)) == Address("::1", 15001)
    assert ipv6_twin(Address("0.0.0.0", 15008)) == Address("::", 15008)
    assert ipv6_twin(Address("10.0.0.7", 15008)) is None


def test_a_host_without_ipv6_gets_no_twin_but_a_taken_port_still_fails() -> None:
    class Loop:
        def __init__(self, code: int) -> None:
            self.code = code

        async def create_server(self, *args: Any, **kwargs: Any) -> Any:
            raise OSError(self.code, os.strerror(self.code))

    twin = Address("::1", 15001)
    no_ipv6 = Loop(errno.EADDRNOTAVAIL)
    assert asyncio.run(listen_if_ipv6(no_ipv6, asyncio.Protocol, twin)) is None  # type: ignore[arg-type]
    with pytest.raises(OSError):
        asyncio.run(listen_if_ipv6(Loop(errno.EADDRINUSE), asyncio.Protocol, twin))  # type: ignore[arg-type]


def test_excluded_ranges_return_before_the_redirect_and_include_ranges_replace_the_catch_all(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "sidecar", "iptables", "--proxy-uid=1337", "--dry-run",
        "--exclude-outbound-ip-ranges=10.96.0.1/32,fd00::/8",
        "--include-outbound-ip-ranges=10.0.0.0/8, fc00::/7",
    ]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    # Each tool gets only its own family's ranges (iptables refuses an IPv6 -d).
    assert [line for line in lines if "-A TRELLIS_OUTPUT" in line and "iptables -t" in line][
        -2:
    ] == [
        "iptables -t nat -A TRELLIS_OUTPUT -d 10.96.0.1/32 -j RETURN",
        "iptables -t nat -A TRELLIS_OUTPUT -p tcp -d 10.0.0.0/8 -j REDIRECT --to-ports 15001",
    ]
    assert [line for line in lines if "ip6tables -t nat -A TRELLIS_OUTPUT" in line][-2:] == [
        "ip6tables -t nat -A TRELLIS_OUTPUT -d fd00::/8 -j RETURN",
        "ip6tables -t nat -A TRELLIS_OUTPUT -p tcp -d fc00::/7 -j REDIRECT --to-ports 15001",
    ]
    # No catch-all redirect is left: only the included ranges reach the sidecar.
    assert not any(line.endswith("-p tcp -j REDIRECT --to-ports 15001") for line in lines)


def test_an_include_list_without_a_range_of_a_family_redirects_none_of_it() -> None:
    from ipaddress import ip_network

    rules = plan(
        proxy_uid=1337, outbound_port=15001, inbound_port=15008,
        include_outbound_ranges=[ip_network("10.0.0.0/8")], family=6,
    )  # fmt: skip
    assert not any("REDIRECT" in r and "TRELLIS_OUTPUT" in r for r in rules)


@pytest.mark.parametrize(
    "flag",
    [
        "--exclude-outbound-ip-ranges=10.0.0.1/8",
        "--exclude-outbound-ip-ranges=*",
        "--include-outbound-ip-ranges=10.0.0.0/33",
        "--include-outbound-ip-ranges=*,10.0.0.0/8",
    ],
)
def test_a_malformed_range_is_refused_in_one_line_before_any_rule(
    capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    try:
        code = main(["sidecar", "iptables", "--proxy-uid=1337", "--dry-run", flag])
    except SystemExit as exited:  # argparse's own refusal of a flag value
        code = int(exited.code or 0)
    captured = capsys.readouterr()
    assert code != 0 and captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert "error" in last and ("CIDR" in last or "every address" in last), last


def test_the_proxys_own_connections_to_the_pod_ip_return_before_any_outbound_redirect() -> None:
    """The sidecar dials the app at the pod IP (``sidecar.appaddress``): that connection,
    from the proxy UID, must leave the OUTPUT chain before any redirect, whatever its
    destination, or it would loop back into the sidecar's own outbound port (Istio added
    rules for exactly this). The inbound chain is never met by it: NAT is decided once per
    connection, in OUTPUT for a local one. The kube test runs this for real."""
    from ipaddress import ip_network

    for family, ranges in ((4, [ip_network("10.0.0.0/8")]), (6, [ip_network("fc00::/7")])):
        for include in (None, ranges):
            rules = plan(
                proxy_uid=1337,
                outbound_port=15001,
                inbound_port=15008,
                exclude_outbound_ranges=[ip_network("10.96.0.0/12")],
                include_outbound_ranges=include,
                family=family,  # type: ignore[arg-type]
            )
            chain = [rule for rule in rules if rule[:4] == ["-t", "nat", "-A", "TRELLIS_OUTPUT"]]
            # First, and with no destination or port condition: it covers the pod IP.
            assert chain[0][4:] == ["-m", "owner", "--uid-owner", "1337", "-j", "RETURN"]
            assert any("REDIRECT" in rule for rule in chain[1:])
