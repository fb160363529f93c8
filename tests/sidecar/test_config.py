# ruff: noqa: E501  (tables of cases read best one per line)
"""Configuration: YAML and flags become frozen values; bad input names its field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import build_config
from sidecar.config import (
    Address,
    ConfigError,
    SidecarConfig,
    check_consistency,
    load_yaml,
    parse_config,
    parse_upstreams_flag,
)
from trellis.cli import build_parser

REPO = Path(__file__).resolve().parents[2]

FULL = """
mode: explicit
svid_dir: /tmp/svid
admin: 127.0.0.1:15900
inbound:
  listen: 127.0.0.1:15908
  targets:
    8080:
      app: 127.0.0.1:18080
      allow:
        - exact: spiffe://example.org/ns/default/sa/client
        - prefix: spiffe://example.org/ns/tools
upstreams:
  - name: echo
    listen: 127.0.0.1:9001
    target: echo.default:8080
    endpoints: [127.0.0.1:15008, "[::1]:15008"]
    spiffe_ids: [spiffe://example.org/ns/default/sa/echo]
pool:
  max_streams_per_connection: 50
  idle_timeout: 90s
drain_timeout: 3s
"""


def test_a_full_yaml_document_becomes_typed_frozen_values() -> None:
    config = load_yaml(FULL)
    assert config.admin == Address("127.0.0.1", 15900)
    assert config.inbound.listen == Address("127.0.0.1", 15908)
    target = config.inbound.targets[8080]
    assert target.app == Address("127.0.0.1", 18080)
    assert target.allow is not None and [str(r) for r in target.allow] == [
        "exact:spiffe://example.org/ns/default/sa/client",
        "prefix:spiffe://example.org/ns/tools",
    ]
    assert config.inbound.app_for(8080) == Address("127.0.0.1", 18080)
    assert config.inbound.app_for(9090) is None  # not declared: never forwarded
    upstream = config.upstreams[0]
    assert upstream.endpoints == (Address("127.0.0.1", 15008), Address("::1", 15008))
    assert str(upstream.endpoints[1]) == "[::1]:15008"
    assert [str(i) for i in upstream.spiffe_ids] == ["spiffe://example.org/ns/default/sa/echo"]
    assert config.pool.max_streams_per_connection == 50
    assert config.pool.idle_timeout == 90.0
    assert config.drain_timeout == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = "transparent"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("mode: sideways", "mode"),
        ("colour: blue", "colour"),
        ("inbound: {listen: 'nonsense'}", "inbound.listen"),
        ("inbound: {targets: {http: {}}}", "inbound.targets.http"),
        ("inbound: {targets: {8080: {app: 'x:99999'}}}", "inbound.targets.8080.app"),
        ("inbound: {targets: {8080: {allow: [{exact: 'http://x'}]}}}", "inbound.targets.8080.allow[0].exact"),
        ("inbound: {targets: {8080: {allow: [{maybe: 'spiffe://a/b'}]}}}", "inbound.targets.8080.allow[0]"),
        ("upstreams: [{listen: 9001, target: 'a:1'}]", "upstreams[0].endpoints"),
        ("upstreams: [{listen: 9001, target: 'a:1', endpoints: []}]", "upstreams[0].endpoints"),
        ("upstreams: [{listen: 9001, target: 'a:1', endpoints: ['b']}]", "upstreams[0].endpoints[0]"),
        ("upstreams: [{listen: 9001, target: 'a:1', endpoints: ['b:1'], spiffe_ids: ['nope']}]", "upstreams[0].spiffe_ids[0]"),
        ("pool: {idle_timeout: soon}", "pool.idle_timeout"),
        ("pool: {max_streams_per_connection: 0}", "pool.max_streams_per_connection"),
        ("drain_timeout: -1", "drain_timeout"),
        ("admin: 0.0.0.0:15000", "admin"),
        ("admin: 10.0.0.7:15000", "admin"),
        ("health: 'nowhere'", "health"),
        ("[1, 2]", ""),
    ],
)  # fmt: skip
def test_a_bad_value_is_refused_naming_its_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_yaml(text)
    assert info.value.field == field, str(info.value)


def test_malformed_yaml_is_refused_in_words() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml("inbound: [")


def test_yaml_nested_too_deeply_is_refused_in_words_not_a_recursion_error() -> None:
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_yaml("[" * 100_000)


def test_two_listeners_on_one_address_are_refused() -> None:
    config = load_yaml(
        "admin: 127.0.0.1:9001\nupstreams: [{listen: 9001, target: 'a:1', endpoints: ['b:1']}]"
    )
    with pytest.raises(ConfigError) as info:
        check_consistency(config)
    assert info.value.field == "upstreams[0].listen"


@pytest.mark.parametrize(
    ("key", "instead"),
    [
        ("strict: false", "only the ports under inbound.targets are reachable"),
        ("strict: true", "delete this key"),
        ("default_app_host: 127.0.0.1", "list each port under inbound.targets"),
    ],
)
def test_the_keys_that_forwarded_undeclared_ports_are_refused_saying_what_to_write(
    key: str, instead: str
) -> None:
    with pytest.raises(ConfigError, match=instead) as info:
        load_yaml(f"inbound:\n  {key}\n  targets: {{8080: {{}}}}\n")
    assert info.value.field == "inbound." + key.split(":")[0]


def test_without_targets_no_port_is_forwarded_and_a_bare_target_is_the_local_app() -> None:
    assert SidecarConfig().inbound.app_for(8080) is None
    assert SidecarConfig().inbound.app_for(15000) is None
    config = load_yaml("inbound: {targets: {8080: {}, 9090: {app: 19090}}}")
    assert config.inbound.app_for(8080) == Address("127.0.0.1", 8080)
    assert config.inbound.app_for(9090) == Address("127.0.0.1", 19090)
    assert config.inbound.app_for(8081) is None


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("admin: 127.0.0.1:15000\ninbound: {targets: {15000: {}}}", "admin"),
        ("admin: 127.0.0.1:15000\ninbound: {targets: {80: {app: 127.0.0.1:15000}}}", "admin"),
        ("health: 0.0.0.0:15020\ninbound: {targets: {15020: {}}}", "health"),
        ("inbound: {listen: 0.0.0.0:15008, targets: {15008: {}}}", "inbound"),
        ("mode: transparent\ninbound: {targets: {15001: {}}}", "outbound"),
        (
            "upstreams: [{name: db, listen: 9001, target: 'a:1', endpoints: ['b:1']}]\n"
            "inbound: {targets: {9001: {}}}",
            "upstream 'db' listener",
        ),
    ],
)
def test_a_target_on_the_sidecars_own_port_is_refused(text: str, what: str) -> None:
    with pytest.raises(ConfigError, match=f"sidecar's own {what} port") as info:
        check_consistency(load_yaml(text))
    assert info.value.field.startswith("inbound.targets.")


def test_the_app_ports_flag_never_names_the_sidecars_own_ports() -> None:
    for argv, what in (
        (["--app-ports=8080,15000"], "admin"),
        (["--health-port=15020", "--app-ports=15020"], "health"),
        (["--inbound-port=15008", "--app-ports=15008"], "inbound"),
    ):
        with pytest.raises(ConfigError, match=f"own {what} port") as info:
            build_config(build_parser().parse_args(["sidecar", *argv]))
        assert info.value.field == "--app-ports"


def test_the_admin_port_stays_on_loopback_whatever_the_listen_host() -> None:
    args = ["sidecar", "--listen-host=10.1.2.3", "--admin-port=15000", "--health-port=15020"]
    config = build_config(build_parser().parse_args(args))
    assert config.admin == Address("127.0.0.1", 15000)
    assert config.health == Address("10.1.2.3", 15020)
    assert config.inbound.listen == Address("10.1.2.3", 15008)
    assert build_config(build_parser().parse_args(["sidecar"])).health is None


def test_a_yaml_target_keeps_its_app_and_rules_when_app_ports_names_it_too(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inbound: {targets: {8080: {app: 127.0.0.1:18080, allow: []}}}\n")
    args = build_parser().parse_args(["sidecar", "--config", str(path), "--app-ports=8080,81"])
    targets = build_config(args).inbound.targets
    assert targets[8080].app == Address("127.0.0.1", 18080) and targets[8080].allow == ()
    assert targets[81].app == Address("127.0.0.1", 81) and targets[81].allow is None


def test_the_injector_upstreams_flag_dials_the_service_sidecar_on_the_inbound_port() -> None:
    (upstream,) = parse_upstreams_flag("api.default:8080=9001", 15008)
    assert upstream.listen == Address("127.0.0.1", 9001)
    assert upstream.target == "api.default:8080"
    assert upstream.endpoints == (Address("api.default", 15008),)
    assert upstream.spiffe_ids == ()
    with pytest.raises(ConfigError, match="used twice"):
        parse_upstreams_flag("a:1=9001,b:2=9001", 15008)
    with pytest.raises(ConfigError, match="SERVICE:PORT=LOCAL_PORT"):
        parse_upstreams_flag("a:1", 15008)


def test_the_injector_command_line_parses_into_a_config(tmp_path: Path) -> None:
    # Exactly what mesh_operator/injection.py writes into the pod.
    args = build_parser().parse_args(
        [
            "sidecar",
            "--mode=explicit",
            "--outbound-port=15001",
            "--inbound-port=15008",
            "--admin-port=15000",
            "--health-port=15020",
            "--policy=/etc/trellis/policy/policy.json",
            "--pod-labels=/etc/trellis/podinfo/labels",
            "--app-ports=8080,9090",
            "--upstreams=api.default:8080=9001",
        ]
    )
    config = build_config(args)
    assert isinstance(config, SidecarConfig)
    assert config.inbound.listen == Address("0.0.0.0", 15008)
    assert config.admin == Address("127.0.0.1", 15000)
    assert config.health == Address("0.0.0.0", 15020)
    assert {p: t.app for p, t in config.inbound.targets.items()} == {
        8080: Address("127.0.0.1", 8080),
        9090: Address("127.0.0.1", 9090),
    }
    assert all(t.allow is None for t in config.inbound.targets.values())  # the policy decides
    assert config.policy_file == "/etc/trellis/policy/policy.json"
    assert config.upstreams[0].listen.port == 9001
    transparent = build_config(
        build_parser().parse_args(["sidecar", "--mode=transparent", "--admin-port=off"])
    )
    assert transparent.mode == "transparent" and transparent.admin is None
    assert transparent.outbound == Address("127.0.0.1", 15001)


def test_the_injector_iptables_command_line_is_accepted() -> None:
    args = build_parser().parse_args(
        [
            "sidecar",
            "iptables",
            "--proxy-uid=1337",
            "--outbound-port=15001",
            "--inbound-port=15008",
            "--exclude-inbound-ports=15020",
            "--exclude-outbound-ports=5432,6379",
        ]
    )
    assert args.proxy_uid == 1337 and args.exclude_outbound_ports == [5432, 6379]


def _trellis(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )


def test_the_cli_refuses_a_bad_config_file_in_one_line_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstreams: [{listen: 9001, target: 'a:1', endpoints: ['b:http']}]\n")
    result = _trellis("sidecar", "--config", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "trellis: error: sidecar configuration: upstreams[0].endpoints[0]: "
        "port 'http' in 'b:http' is not a port number"
    ]
    missing = _trellis("sidecar", "--config", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 1 and "--config" in missing.stderr
    flag = _trellis("sidecar", "--inbound-port=70000")
    assert flag.returncode == 2 and "--inbound-port" in flag.stderr
    assert "Traceback" not in result.stderr + missing.stderr + flag.stderr


def test_an_upstreams_flag_with_a_huge_port_is_refused_in_one_line() -> None:
    """Python refuses int() of more than 4,300 digits with a ValueError, which escaped the
    configuration errors as a traceback; the grammar takes five digits at most."""
    result = _trellis("sidecar", "--admin-port=off", f"--upstreams=api:{'9' * 5000}=9001")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("trellis: error: sidecar configuration: --upstreams[0]: 'api:999")
    assert "must look like SERVICE:PORT=LOCAL_PORT" in line and len(line) < 300


@pytest.mark.parametrize(
    "address", [f"127.0.0.1:{'9' * 5000}", "9" * 5000, "127.0.0.1:\u00b2", "\u00b2", "h:0x1f"]
)
def test_an_address_whose_port_is_not_five_ascii_digits_is_a_config_error(address: str) -> None:
    """`int()` refuses more than 4,300 digits and superscript digits that `isdigit()`
    accepts; both once escaped as a ValueError traceback. The error line stays short."""
    with pytest.raises(ConfigError, match=r"not a port number|expected HOST:PORT") as caught:
        parse_config({"admin": address})
    assert len(str(caught.value)) < 300


def test_without_an_identity_source_the_sidecar_says_so(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "SPIFFE_ENDPOINT_SOCKET"}
    result = subprocess.run(
        [sys.executable, "-m", "trellis", "sidecar", "--admin-port=off", "--inbound-port=1"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert "no identity source" in result.stderr and "Traceback" not in result.stderr
