"""The command line users of kubectl, istioctl and spire expect: ``--version`` and a build
metric, shell completion, one duration syntax, socket URIs, help and defaults on every
flag, YAML kept YAML, and one line (never a traceback) when a long-running command
cannot start. Every command runs as a real process or through ``main`` on real sockets."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca.agent.metrics import AgentMetrics
from ca.server.metrics import CaMetrics
from core.buildinfo import version
from mesh_operator.metrics import WebhookMetrics
from sidecar.metrics import Metrics as SidecarMetrics
from tests.ca.agent.conftest import WEB, LiveCa, entry, make_upstream, run, running_agent
from tests.ca.agent.conftest import live_ca as live_ca  # the live CA fixture, re-exported
from tests.ca.server.conftest import CLUSTER, make_ca_dir
from trellis.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def trellis(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
        env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("trellis: "), result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


def closed_port() -> int:
    """A loopback port this test bound and closed: nothing listens on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port this test holds with a listening socket."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tr-cli-"))  # a Unix socket path has 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ca_dir(tmp_path_factory.mktemp("ca")).root_dir


# --- --version and trellis_build_info ----------------------------------------------------


def _git_head() -> str | None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return head.stdout.strip() or None


def test_version_names_the_package_version_and_the_source_revision() -> None:
    result = trellis("--version")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"trellis {version()}")
    head = _git_head()
    if head is not None:
        assert line == f"trellis {version()} (revision {head[:12]})"


def test_every_metrics_registry_exports_build_info_with_the_version() -> None:
    """Every process's registry, in process (the sidecar, agent and operator registries are
    served only by a whole data plane or cluster); the CA's is scraped from a real process
    below."""
    expected = f'trellis_build_info{{revision="{(_git_head() or "unknown")[:12]}"'
    expected += f',version="{version()}"}} 1.0'
    from prometheus_client import generate_latest

    for registry in (
        CaMetrics("example.org", "c").registry,
        AgentMetrics().registry,
        SidecarMetrics().registry,
        WebhookMetrics().registry,
    ):
        assert expected in generate_latest(registry).decode()


def test_a_running_ca_serves_build_info_on_its_metrics_endpoint(ca_dir: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "trellis", "ca", "serve", "--dir", str(ca_dir),
            "--cluster", CLUSTER, "--listen", "127.0.0.1:0", "--attest-listen", "127.0.0.1:0",
            "--bundle-listen", "off", "--metrics-listen", "127.0.0.1:0", "--sign-workers", "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:  # bounded: a hung start fails the test
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=60), "ca serve printed no ready line in 60s"
        ready = json.loads(process.stdout.readline())
        url = f"http://{ready['metrics_listen']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
    finally:
        process.kill()
        process.wait(timeout=10)
    assert re.search(r'^trellis_build_info\{.*version="' + re.escape(version()), body, re.M)


# --- shell completion ---------------------------------------------------------------------


def _bash_complete(script: Path, *words: str) -> list[str]:
    """What the completion function offers for ``words`` (the last one being completed),
    run in a real bash that sourced the script."""
    program = (
        f"source {script}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n'
        "_trellis\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "--norc", "-c", program, "bash", *words],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return [line for line in result.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = trellis("completion", "bash")
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("completion") / "trellis.bash"
    path.write_text(result.stdout)
    return path


def test_bash_completes_subcommands_flags_and_choices_from_the_parser(bash_script: Path) -> None:
    assert _bash_complete(bash_script, "trellis", "ca", "se") == ["serve"]
    assert _bash_complete(bash_script, "trellis", "sv") == ["svid"]
    assert _bash_complete(bash_script, "trellis", "svid", "fetch", "--ti") == ["--timeout"]
    assert _bash_complete(bash_script, "trellis", "ca", "bundle", "--format", "") == [
        "spiffe",
        "pem",
    ]
    # A flag's value is not taken for a subcommand: `--dir ca` stays under `ca init`.
    assert _bash_complete(bash_script, "trellis", "ca", "init", "--dir", "ca", "--tt") == ["--ttl"]
    # A flag that takes a path leaves completion to readline's file names.
    assert _bash_complete(bash_script, "trellis", "ca", "init", "--dir", "") == []


def _script(tmp_path: Path, shell: str) -> Path:
    result = trellis("completion", shell)
    assert result.returncode == 0, result.stderr
    path = tmp_path / f"trellis.{shell}"
    path.write_text(result.stdout)
    return path


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_walks_the_same_tree(tmp_path: Path) -> None:
    """zsh's completion widgets run only inside an interactive line editor, so its
    ``compadd`` and ``_files`` are stand-ins here that print what they are given; the walk
    over the typed words is the script's own, run by a real zsh."""
    script = _script(tmp_path, "zsh")
    assert subprocess.run(["zsh", "-n", str(script)], check=False).returncode == 0

    def offered(*words: str) -> list[str]:
        program = (
            'compdef() { :; }; compadd() { shift; print -l -- "$@"; }; _files() { print FILES; }\n'
            f"source {script}\n"
            'words=("$@"); CURRENT=$#words; _trellis\n'
        )
        done = subprocess.run(
            ["zsh", "-f", "-c", program, "zsh", *words],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return done.stdout.split()

    assert "serve" in offered("trellis", "ca", "se")
    assert "svid" not in offered("trellis", "ca", "se")  # under `ca`, not the top level
    assert offered("trellis", "ca", "bundle", "--format", "") == ["spiffe", "pem"]
    assert offered("trellis", "ca", "init", "--dir", "") == ["FILES"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_subcommands_flags_and_choices(tmp_path: Path) -> None:
    script = _script(tmp_path, "fish")

    def offered(line: str) -> list[str]:
        done = subprocess.run(
            ["fish", "--no-config", "-c", f"source {script}; complete -C{line!r}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return [row.split("\t")[0] for row in done.stdout.splitlines()]

    assert offered("trellis ca se") == ["serve"]
    assert offered("trellis svid fetch --ti") == ["--timeout"]
    assert sorted(offered("trellis ca bundle --format ")) == ["pem", "spiffe"]


# --- durations -------------------------------------------------------------------------------


def test_a_bare_number_is_seconds_on_svid_fetch_and_debug_tls_client(short_dir: Path) -> None:
    """Both used to be refused as malformed command lines (exit 2): svid fetch took only
    ``2s``, tls-client only ``5``. Now each reaches its peer and fails for that reason."""
    fetch = trellis("svid", "fetch", "--socket", str(short_dir / "none.sock"), "--timeout", "2")
    assert_one_line_error(fetch, "Workload API at unix:")
    assert fetch.returncode == 1
    port = closed_port()
    client = trellis(
        "debug", "tls-client", f"https://127.0.0.1:{port}/", "--insecure", "--timeout", "5s"
    )
    assert_one_line_error(client, f"127.0.0.1:{port}: Connect call failed")
    assert client.returncode == 1


def test_a_ttl_over_the_limit_is_printed_in_hours(ca_dir: Path, tmp_path: Path) -> None:
    result = trellis(
        "ca", "issue", "--dir", str(ca_dir), "--cluster", CLUSTER, "--spiffe-id", WEB,
        "--ttl", "48h", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert_one_line_error(result, "X509-SVID TTL 48h exceeds the maximum of 24h")


# --- socket URIs ---------------------------------------------------------------------------


def test_svid_fetch_takes_the_socket_as_a_spiffe_endpoint_uri(
    live_ca: LiveCa, short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fetch() -> int:
        async with running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent:
            uri = f"unix://{agent.config.socket_path}"
            return await asyncio.to_thread(main, ["svid", "fetch", "--socket", uri, "--json"])

    assert run(fetch()) == 0
    assert [s["spiffe_id"] for s in json.loads(capsys.readouterr().out)["svids"]] == [WEB]


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["svid", "fetch"], "--socket"),
        (["agent"], "--socket"),
        (["sidecar"], "--workload-api-socket"),
    ],
)
@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("tcp://127.0.0.1:8000", "Unix socket only"),
        ("unix://host/run/agent.sock", "is not unix:///PATH"),
        ("http:///run/agent.sock", "is not unix:///PATH or a path"),
    ],
)
def test_a_socket_flag_refuses_tcp_and_malformed_uris_in_one_line(
    command: list[str], flag: str, address: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, flag, address])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert reason in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith("trellis ")  # argparse's own one-line error


def test_svid_fetch_refuses_a_tcp_spiffe_endpoint_socket_in_one_line() -> None:
    env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": "tcp://127.0.0.1:8000"}
    result = trellis("svid", "fetch", env=env)
    assert_one_line_error(result, "$SPIFFE_ENDPOINT_SOCKET: 'tcp://127.0.0.1:8000'", "Unix socket")


# --- help and defaults ---------------------------------------------------------------------


def _parsers(
    parser: argparse.ArgumentParser, path: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_flag_of_every_command_has_help() -> None:
    missing = [
        f"{path} {'/'.join(action.option_strings) or action.dest}"
        for path, parser in _parsers(build_parser(), "trellis")
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()
    ]
    assert missing == []


def test_help_shows_defaults_as_they_are_typed() -> None:
    result = trellis("ca", "serve", "--help")
    text = " ".join(result.stdout.split())  # argparse wraps the help text
    assert "(default: 127.0.0.1:8081)" in text
    assert "lifetime of the --join-token tokens (default: 1h)" in text
    assert "checked for changes (default: 1s)" in text
    assert "0:00" not in text  # never str(timedelta)


# --- operator inject: YAML in, YAML out ----------------------------------------------------

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web", "namespace": "default"},
    "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "app:1"}]},
}


def test_operator_inject_keeps_yaml_for_yaml_and_json_for_json(tmp_path: Path) -> None:
    source = tmp_path / "pod.yaml"
    source.write_text(yaml.safe_dump(POD))
    as_yaml = trellis("operator", "inject", str(source))
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert as_yaml.stdout.startswith("apiVersion: v1\n")
    injected = yaml.safe_load(as_yaml.stdout)
    assert "trellis-sidecar" in [c["name"] for c in injected["spec"]["initContainers"]]

    source_json = tmp_path / "pod.json"
    source_json.write_text(json.dumps(POD))
    as_json = trellis("operator", "inject", str(source_json))
    assert json.loads(as_json.stdout) == injected

    forced = trellis("operator", "inject", str(source), "-o", "json")
    assert json.loads(forced.stdout) == injected


def test_operator_inject_can_mount_the_socket_from_a_host_path(tmp_path: Path) -> None:
    source = tmp_path / "pod.yaml"
    source.write_text(yaml.safe_dump(POD))
    csi = yaml.safe_load(trellis("operator", "inject", str(source)).stdout)
    host = yaml.safe_load(
        trellis(
            "operator", "inject", str(source), "--agent-socket-volume", "hostpath",
            "--agent-socket-dir", "/run/trellis/sockets",
        ).stdout
    )  # fmt: skip

    def socket_volume(pod: dict[str, Any]) -> dict[str, Any]:
        (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "trellis-workload-api"]
        return volume

    assert socket_volume(csi)["csi"]["driver"] == "csi.trellis.dev"
    assert socket_volume(host) == {
        "name": "trellis-workload-api",
        "hostPath": {"path": "/run/trellis/sockets", "type": "Directory"},
    }


# --- one line, never a traceback, when a long-running command cannot start ------------------


def test_ca_serve_on_a_busy_port_is_one_line_naming_the_flag(ca_dir: Path, busy_port: int) -> None:
    result = trellis(
        "ca", "serve", "--dir", str(ca_dir), "--cluster", CLUSTER,
        "--listen", f"127.0.0.1:{busy_port}", "--attest-listen", "127.0.0.1:0",
        "--bundle-listen", "off", "--sign-workers", "0",
    )  # fmt: skip
    assert_one_line_error(result, f"--listen 127.0.0.1:{busy_port}", "in use")


def test_the_sidecar_on_a_busy_admin_port_is_one_line(ca_dir: Path, busy_port: int) -> None:
    # Its other listener on a port of its own: 15008 may be taken by another test's sidecar.
    result = trellis(
        "sidecar", "--svid-dir", str(ca_dir), "--listen-host", "127.0.0.1",
        "--inbound-port", str(closed_port()), "--admin-port", str(busy_port),
    )  # fmt: skip
    assert_one_line_error(result, f"admin port 127.0.0.1:{busy_port}", "in use")


def test_the_agent_on_a_busy_admin_port_is_one_line(
    ca_dir: Path, busy_port: int, short_dir: Path
) -> None:
    entries = short_dir / "entries.yaml"
    entries.write_text("entries: []\n")
    result = trellis(
        "agent", "--local-ca", str(ca_dir), "--cluster", CLUSTER, "--entries", str(entries),
        "--node", "node-a", "--socket", str(short_dir / "agent.sock"),
        "--data-dir", str(short_dir / "data"), "--admin", f"127.0.0.1:{busy_port}",
    )  # fmt: skip
    assert_one_line_error(result, f"--admin 127.0.0.1:{busy_port}", "in use")


def test_up_with_a_busy_port_in_its_range_names_the_process_and_port_in_one_line(
    busy_port: int,
) -> None:
    """Progress lines come first (what it was starting); the failure is one line naming
    the child that failed and why, no longer the child's message quoted under it."""
    result = trellis("up", "--port-base", str(busy_port), "--duration", "5s")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [result.stderr.splitlines()[-1]], result.stderr
    assert errors[0].startswith("trellis: error: ca stopped before reporting 'ready'")
    assert f"--listen 127.0.0.1:{busy_port}: cannot listen: Address already in use" in errors[0]


def test_the_operator_on_a_busy_webhook_port_is_one_line(busy_port: int) -> None:
    result = trellis(
        "operator", "run", "--trust-domain", "example.org", "--kubeconfig", "/nonexistent",
        "--webhook-host", "127.0.0.1", "--webhook-port", str(busy_port),
    )  # fmt: skip
    assert_one_line_error(result, f"--webhook-port 127.0.0.1:{busy_port}", "in use")


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


def test_the_operator_with_an_unreachable_api_server_is_one_line(tmp_path: Path) -> None:
    server = f"http://127.0.0.1:{closed_port()}"
    result = trellis(
        "operator", "run", "--trust-domain", "example.org", "--no-webhook",
        "--kubeconfig", str(_kubeconfig(tmp_path / "kubeconfig", server)),
    )  # fmt: skip
    assert_one_line_error(result, f"cannot reach the Kubernetes API server {server}", "refused")


@pytest.mark.parametrize(
    "args",
    [
        ["operator", "run", "--trust-domain", "example.org", "--kubeconfig", "BROKEN"],
        ["sidecar", "--config", "BROKEN"],
        ["ca", "serve", "--dir", "CA", "--cluster", CLUSTER, "--listen", "127.0.0.1:0",
         "--attest-listen", "127.0.0.1:0", "--bundle-listen", "off", "--entries", "BROKEN"],
    ],
)  # fmt: skip
def test_a_long_running_command_given_broken_yaml_says_where_in_one_line(
    args: list[str], ca_dir: Path, tmp_path: Path
) -> None:
    """PyYAML's own message spans four lines (and the kubeconfig loader let it escape as a
    traceback); what is printed is its position and problem."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("entries: [\n")
    swap = {"BROKEN": str(broken), "CA": str(ca_dir)}
    result = trellis(*[swap.get(a, a) for a in args])
    assert_one_line_error(result, "line 2, column 1: expected the node content")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["operator", "run", "--trust-domain", "example.org", "--kubeconfig", "MISSING"],
         "cannot read --kubeconfig"),
        (["sidecar", "--config", "MISSING"], "cannot read"),
        (["agent", "--ca", "127.0.0.1:1", "--trust-bundle", "MISSING"], "cannot read"),
        (["ca", "serve", "--dir", "MISSING", "--cluster", CLUSTER, "--listen", "127.0.0.1:0",
          "--attest-listen", "127.0.0.1:0", "--bundle-listen", "off"], "no intermediate"),
        (["up", "--base-dir", "MISSING"], "is not a directory"),
    ],
)  # fmt: skip
def test_a_long_running_command_given_a_missing_file_says_so_in_one_line(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing")
    result = trellis(*[missing if a == "MISSING" else a for a in args])
    assert_one_line_error(result, expected)
