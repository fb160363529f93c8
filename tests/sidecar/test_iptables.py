"""The transparent-mode redirect as data (the netns test runs it for real)."""

from __future__ import annotations

from sidecar.iptables import plan


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
