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
