"""Trellis beside SPIRE v1.13.3: the same entries, the same client, the same machine and run.

    python3 bench/spire_compare.py [--entries 1000] [--calls 1000] [--rounds 3] [--warmup 200]

Builds spire-server and spire-agent from ``bench/spire/`` on first use (``spire_build``;
cached afterwards), then runs each system in turn on loopback, each from a private
temporary directory, and measures:

1. ``first_sync``: an agent attests with a join token to a server that already holds
   ``--entries`` registration entries for its node, so they all fall due at once; the time
   from starting the agent until it holds every X509-SVID, SVIDs/s over that time, and the
   server's CPU seconds per SVID over it (utime+stime of the server and its children, from
   ``/proc``: Trellis signs in worker processes). When the agent holds them all is read
   from each agent's own account: the Trellis agent's ``trellis_agent_svid_cache_size``
   gauge on its admin endpoint, spire-agent's ``SVID updated`` log line (logged once per
   SVID put into its cache, at debug level, so this agent runs with ``log_level =
   "DEBUG"``; it is stopped afterwards, and a second spire-agent with its own join token
   and SPIRE's default ``info`` level serves 2. and 3., because at debug level spire-agent
   writes two log lines per Workload API call).
2. ``memory``: resident memory (RSS, and PSS, which shares library pages fairly) of the
   server and the agent 2 s after the agent holds all SVIDs.
3. ``workload_api``: FetchX509SVID (first response of the stream) and FetchJWTSVID latency,
   p50/p99, from one go-spiffe client (``bench/spire/cmd/svid-latency``) against each agent
   over its Unix socket, calls one after another on one connection. One entry of the
   ``--entries`` selects the client's uid; the others select uids nothing runs as. Both
   systems stay up from their first sync to the end, so the ``--rounds`` rounds alternate
   between the agents (which goes first alternates too); p50 and p99 are medians over
   the rounds, each round's figures beside them.

Both servers are configured as a user would for this test: no per-agent signing rate limit
(``trellis ca serve --agent-rate``, SPIRE's ``ratelimit { signing = false }``), P-256 keys,
1 h X509-SVIDs, SQLite for SPIRE's datastore and an in-memory key manager; the Trellis
server keeps its default signing workers (one per core). Each agent keeps its own pacing:
spire-agent waits one sync interval (5 s) after attesting before its first sync, then asks
for at most 500 SVIDs per request every 0.5 s; ``seconds_before_first_csr`` and
``svids_per_s_after_first_csr`` split that wait from the signing. SPIRE's server memory is
read after it has served both of its agents. SPIRE's ``require_pq_kem`` stays off: on
v1.13.3 it names a Kyber draft group that current Go no longer has.

Prints one JSON document; ``ratios`` are Trellis over SPIRE (below 1: Trellis is faster or
smaller, except ``svids_per_s``, where above 1 is better). Only ratios carry across
machines. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spire_build import SPIRE_VERSION, MissingPiece, SpireBinaries, ensure_binaries  # noqa: E402

from ca.spiffeid import TrustDomain  # noqa: E402
from trellis.up.identity import create_authorities  # noqa: E402
from trellis.up.processes import free_ports  # noqa: E402

TRUST_DOMAIN = "bench.example"
CLUSTER = "bench"
NODE = "bench"
SVID_TTL_S = 3600
UNUSED_UID_BASE = 100_000  # entries beyond the client's select uids no process runs as
TICKS = os.sysconf("SC_CLK_TCK")
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path holds 108 bytes with the terminator


def progress(message: str) -> None:
    print(f"[spire_compare] {message}", file=sys.stderr, flush=True)


# -- /proc ---------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    found = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += descendants(int(child))
    except FileNotFoundError:
        pass
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants."""
    total = 0.0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def memory_mib(pid: int) -> dict[str, float]:
    """RSS and PSS of ``pid`` and its descendants, MiB."""
    rss = pss = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except FileNotFoundError:
            continue
    return {"rss_mib": round(rss / 1024, 1), "pss_mib": round(pss / 1024, 1)}


# -- processes -----------------------------------------------------------------------------


@contextmanager
def running(
    name: str, argv: list[str], log: Path, **kwargs: Any
) -> Iterator[subprocess.Popen[str]]:
    """A child process with stderr (and stdout unless piped) in ``log``; stopped at exit."""
    with log.open("w") as sink:
        kwargs.setdefault("stdout", sink)
        try:
            process = subprocess.Popen(argv, stderr=sink, text=True, **kwargs)
        except OSError as exc:
            raise MissingPiece(f"cannot start {name}: {exc.strerror or exc}") from exc
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for(
    what: str, check: Callable[[], bool], process: subprocess.Popen[str], log: Path, timeout: float
) -> float:
    """Poll ``check`` every 10 ms; returns the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.monotonic()
        if process.poll() is not None:
            raise MissingPiece(
                f"{what}: the process exited ({process.returncode}): {last_line(log)}"
            )
        if time.monotonic() > deadline:
            raise MissingPiece(f"{what}: not within {timeout:g} s; last log line: {last_line(log)}")
        time.sleep(0.01)


def last_line(log: Path) -> str:
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no {log.name} yet)"
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(empty log)"


def latency(client: Path, socket: Path, kind: str, calls: int, warmup: int) -> dict[str, Any]:
    command = [str(client), "-socket", str(socket), "-kind", kind, "-calls", str(calls)]
    out = subprocess.run(
        [*command, "-warmup", str(warmup)], capture_output=True, text=True, timeout=600
    )
    if out.returncode != 0:
        raise MissingPiece(f"go-spiffe {kind} client against {socket.name}: {out.stderr.strip()}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def workload_api(
    client: Path, sockets: dict[str, Path], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Both agents, kind by kind, alternating which goes first from round to round."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {"x509": [], "jwt": []} for name in sockets
    }
    names = list(sockets)
    for round_ in range(args.rounds):
        for kind in ("x509", "jwt"):
            for name in names if round_ % 2 == 0 else names[::-1]:
                runs[name][kind].append(
                    latency(client, sockets[name], kind, args.calls, args.warmup)
                )
    out: dict[str, dict[str, Any]] = {}
    for name, kinds in runs.items():
        out[name] = {}
        for kind, rounds in kinds.items():
            out[name][kind] = {
                "p50_ms": statistics.median(r["p50_ms"] for r in rounds),
                "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
                "spiffe_id": rounds[0]["spiffe_id"],
                "rounds": [{k: v for k, v in r.items() if k != "spiffe_id"} for r in rounds],
            }
    return out


def first_sync(
    entries: int, started: float, held: float, cpu_before: float, cpu_after: float
) -> dict[str, Any]:
    seconds = held - started
    return {
        "svids": entries,
        "seconds_until_all_held": round(seconds, 3),
        "svids_per_s": round(entries / seconds, 1),
        "server_cpu_s": round(cpu_after - cpu_before, 3),
        "server_cpu_ms_per_svid": round((cpu_after - cpu_before) / entries * 1000, 4),
    }


def spiffe_id(index: int) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/w{index}"


def uid_for(index: int) -> int:
    return os.getuid() if index == 0 else UNUSED_UID_BASE + index


# -- Trellis -------------------------------------------------------------------------------


def trellis_metric(url: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


@contextmanager
def run_trellis(work: Path, args: argparse.Namespace) -> Iterator[tuple[dict[str, Any], Path]]:
    """Trellis's first sync and memory; yields them and the agent's socket, still serving."""
    root_cert = create_authorities(work / "ca", TrustDomain(TRUST_DOMAIN), CLUSTER)
    lines = ["entries:"]
    for i in range(args.entries):
        lines += [
            f"  - spiffe_id: {spiffe_id(i)}",
            f"    selectors: ['unix:uid:{uid_for(i)}']",
            f"    nodes: [{NODE}]",
            f"    ttl: {SVID_TTL_S}s",
        ]
    (work / "entries.yaml").write_text("\n".join(lines) + "\n")
    python = [sys.executable, "-m", "trellis"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(work)}
    env.pop("TRELLIS_KEY_PASSPHRASE", None)
    server_argv = [
        *python, "ca", "serve", "--dir", str(work / "ca"), "--cluster", CLUSTER,
        "--listen", "127.0.0.1:0", "--attest-listen", "127.0.0.1:0",
        "--bundle-listen", "off", "--metrics-listen", "127.0.0.1:0",
        "--entries", str(work / "entries.yaml"),
        "--agent-rate", "1000000", "--agent-burst", "1000000",
        "--join-token", NODE, "--print-join-tokens", "--log-level", "warning",
    ]  # fmt: skip
    result: dict[str, Any] = {}
    with ExitStack() as stack:
        server = stack.enter_context(
            running(
                "trellis ca serve",
                server_argv,
                work / "server.log",
                stdout=subprocess.PIPE,
                env=env,
            )
        )
        assert server.stdout is not None
        ready = json.loads(server.stdout.readline() or "{}")
        token_line = json.loads(server.stdout.readline() or "{}")
        if ready.get("event") != "ready" or "token" not in token_line:
            raise MissingPiece(f"trellis ca serve did not start: {last_line(work / 'server.log')}")
        (admin_port,) = free_ports(1)
        socket = work / "agent.sock"
        token_file = work / "join-token"  # as trellis up does: never a token on argv
        token_file.touch(mode=0o600)
        token_file.write_text(token_line["token"])
        agent_argv = [
            *python, "agent", "--socket", str(socket), "--node", NODE,
            "--ca", ready["listen"], "--ca-attest", ready["attest_listen"],
            "--trust-bundle", str(root_cert), "--join-token-file", str(token_file),
            "--data-dir", str(work / "agent"), "--admin", f"127.0.0.1:{admin_port}",
            "--log-level", "warning",
        ]  # fmt: skip
        metrics = f"http://127.0.0.1:{admin_port}/metrics"
        time.sleep(1.0)  # let the server settle after start-up before its CPU is counted
        cpu_before = cpu_seconds(server.pid)
        started = time.monotonic()
        agent = stack.enter_context(
            running("trellis agent", agent_argv, work / "agent.log", env=env)
        )
        held = wait_for(
            f"trellis agent holding {args.entries} SVIDs",
            lambda: (trellis_metric(metrics, "trellis_agent_svid_cache_size") or 0) >= args.entries,
            agent,
            work / "agent.log",
            args.sync_timeout,
        )
        cpu_after = cpu_seconds(server.pid)
        result["first_sync"] = first_sync(args.entries, started, held, cpu_before, cpu_after)
        time.sleep(2.0)
        result["memory"] = {"server": memory_mib(server.pid), "agent": memory_mib(agent.pid)}
        yield result, socket


# -- SPIRE ---------------------------------------------------------------------------------

SERVER_CONF = """\
server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{work}/server.sock"
    trust_domain = "{td}"
    data_dir = "{work}/server-data"
    log_level = "WARN"
    ca_key_type = "ec-p256"
    default_x509_svid_ttl = "{ttl}s"
    # The same choice as the Trellis server's --agent-rate: no per-agent signing limit.
    ratelimit {{
        signing = false
    }}
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{work}/datastore.sqlite3"
        }}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
}}
"""

AGENT_CONF = """\
agent {{
    data_dir = "{work}/{name}-data"
    log_level = "{log_level}"
    log_file = "{work}/{name}-events.log"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{work}/{name}.sock"
    trust_bundle_path = "{work}/bundle.pem"
    trust_domain = "{td}"
    workload_x509_svid_key_type = "ec-p256"
    x509_svid_cache_max_size = {entries}
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "memory" {{
        plugin_data {{}}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"""


def spire_cli(binary: Path, *argv: str) -> str:
    out = subprocess.run([str(binary), *argv], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        message = (out.stderr.strip() or out.stdout.strip()).splitlines()
        raise MissingPiece(
            f"spire-server {argv[0]} {argv[1]}: {message[-1] if message else out.returncode}"
        )
    return out.stdout


def count_lines(path: Path, needle: str) -> int:
    try:
        return path.read_text(errors="replace").count(needle)
    except FileNotFoundError:
        return 0


@contextmanager
def run_spire(
    work: Path, args: argparse.Namespace, binaries: SpireBinaries
) -> Iterator[tuple[dict[str, Any], Path]]:
    """SPIRE's first sync and memory; yields them and the agent's socket, still serving."""
    (port,) = free_ports(1)
    fields = {
        "port": port,
        "work": work,
        "td": TRUST_DOMAIN,
        "ttl": SVID_TTL_S,
        "entries": args.entries,
    }
    (work / "server.conf").write_text(SERVER_CONF.format(**fields))
    # Two agents, one after the other, each with its own join token: the first logs at
    # debug level, where "SVID updated" (once per SVID put into its cache) tells when it
    # holds them all; the second at SPIRE's default, info, for memory and latency, since at
    # debug level spire-agent writes two log lines per Workload API call.
    for name, level in (("sync-agent", "DEBUG"), ("agent", "INFO")):
        conf = AGENT_CONF.format(**fields, name=name, log_level=level)
        (work / f"{name}.conf").write_text(conf)
    admin = ["-socketPath", str(work / "server.sock")]
    result: dict[str, Any] = {}
    with ExitStack() as stack:
        server_argv = [str(binaries.server), "run", "-config", str(work / "server.conf")]
        server = stack.enter_context(running("spire-server", server_argv, work / "server.log"))

        def healthy() -> bool:
            check = subprocess.run(
                [str(binaries.server), "healthcheck", *admin, "-shallow"],
                capture_output=True,
                timeout=30,
            )
            return check.returncode == 0

        wait_for("spire-server healthy", healthy, server, work / "server.log", 60)
        parent = f"spiffe://{TRUST_DOMAIN}/node/{NODE}"
        tokens = []
        for _ in range(2):
            out = spire_cli(
                binaries.server, "token", "generate", *admin, "-spiffeID", parent, "-ttl", "600"
            )
            tokens.append(out.split("Token:", 1)[1].split()[0])
        entries = [
            {
                "spiffe_id": spiffe_id(i),
                "parent_id": parent,
                "selectors": [{"type": "unix", "value": f"uid:{uid_for(i)}"}],
                "x509_svid_ttl": SVID_TTL_S,
            }
            for i in range(args.entries)
        ]
        for start in range(0, len(entries), 250):  # the CLI creates a file's entries in one call
            batch = work / "entries.json"
            batch.write_text(json.dumps({"entries": entries[start : start + 250]}))
            spire_cli(binaries.server, "entry", "create", *admin, "-data", str(batch))
        count = spire_cli(binaries.server, "entry", "count", *admin)
        progress(f"spire-server holds {count.strip()}")
        (work / "bundle.pem").write_text(spire_cli(binaries.server, "bundle", "show", *admin))

        def agent_argv(name: str, token: str) -> list[str]:
            return [
                str(binaries.agent),
                "run",
                "-config",
                str(work / f"{name}.conf"),
                "-joinToken",
                token,
            ]

        time.sleep(1.0)
        cpu_before = cpu_seconds(server.pid)
        started = time.monotonic()
        with running(
            "spire-agent", agent_argv("sync-agent", tokens[0]), work / "sync-agent.log"
        ) as agent:
            events = work / "sync-agent-events.log"
            first_csr: list[float] = []

            def all_held() -> bool:
                text = events.read_text(errors="replace") if events.exists() else ""
                if not first_csr and "Creating X509-SVID" in text:
                    first_csr.append(time.monotonic())
                return text.count("SVID updated") >= int(args.entries)

            held = wait_for(
                f"spire-agent holding {args.entries} SVIDs",
                all_held,
                agent,
                events,
                args.sync_timeout,
            )
            cpu_after = cpu_seconds(server.pid)
        result["first_sync"] = first_sync(args.entries, started, held, cpu_before, cpu_after)
        # spire-agent waits one sync interval (5 s) after attesting before its first
        # sync; what it does after that is the signing itself.
        csr_at = first_csr[0] if first_csr else started
        result["first_sync"]["seconds_before_first_csr"] = round(csr_at - started, 3)
        result["first_sync"]["svids_per_s_after_first_csr"] = round(
            args.entries / (held - csr_at), 1
        )

        agent = stack.enter_context(
            running("spire-agent", agent_argv("agent", tokens[1]), work / "agent.log")
        )
        events = work / "agent-events.log"
        # At info level the agent logs "Creating X509-SVID" as it sends each CSR; the
        # answers follow within one round trip, and the second settles them.
        wait_for(
            f"spire-agent asking for {args.entries} SVIDs",
            lambda: count_lines(events, "Creating X509-SVID") >= args.entries,
            agent,
            events,
            args.sync_timeout,
        )
        time.sleep(2.0)
        result["memory"] = {"server": memory_mib(server.pid), "agent": memory_mib(agent.pid)}
        yield result, work / "agent.sock"


# -- report --------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(trellis: dict[str, Any], spire: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("x509", "jwt"):
        for p in ("p50_ms", "p99_ms"):
            t, s = trellis["workload_api"][kind][p], spire["workload_api"][kind][p]
            out[f"fetch_{kind}_{p.removesuffix('_ms')}"] = ratio(t, s)
    for key in ("seconds_until_all_held", "svids_per_s", "server_cpu_ms_per_svid"):
        out[f"first_sync_{key}"] = ratio(trellis["first_sync"][key], spire["first_sync"][key])
    # Trellis's whole first sync (attestation included) against SPIRE's after its wait.
    out["first_sync_svids_per_s_against_spire_after_first_csr"] = ratio(
        trellis["first_sync"]["svids_per_s"], spire["first_sync"]["svids_per_s_after_first_csr"]
    )
    for side in ("server", "agent"):
        for key in ("rss_mib", "pss_mib"):
            out[f"{side}_{key}"] = ratio(trellis["memory"][side][key], spire["memory"][side][key])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--entries", type=int, default=1000, help="registration entries for the node"
    )
    parser.add_argument(
        "--calls", type=int, default=1000, help="timed Workload API calls per kind and round"
    )
    parser.add_argument("--rounds", type=int, default=3, help="Workload API rounds per agent")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--sync-timeout", type=float, default=300.0, help="seconds")
    args = parser.parse_args()
    if min(args.entries, args.calls, args.rounds) < 1:
        parser.error("--entries, --calls and --rounds must be at least 1")

    binaries = ensure_binaries()
    version = subprocess.run(
        [str(binaries.server), "--version"], capture_output=True, text=True, check=False
    )
    result: dict[str, Any] = {
        "benchmark": "spire_compare",
        "machine": {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
        "versions": {
            # The binary says "1.13.3-dev-unk": SPIRE's release builds set a git tag by ldflags.
            "spire_module": f"github.com/spiffe/spire {SPIRE_VERSION}",
            "spire_binary": (version.stdout or version.stderr).strip(),
            "go": binaries.go_version,
            "python": platform.python_version(),
        },
        "entries": args.entries,
        "calls_each": args.calls,
        "rounds": args.rounds,
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tr-spire-") as tmp, ExitStack() as stack:
        if len(str(Path(tmp) / "trellis" / "agent.sock").encode()) > MAX_SOCKET_PATH:
            raise MissingPiece(f"TMPDIR {tempfile.gettempdir()} is too deep for Unix socket paths")
        sockets = {}
        for name in ("trellis", "spire"):
            work = Path(tmp) / name
            work.mkdir()
            progress(f"{name}: {args.entries} entries, first sync, memory")
            run = run_trellis(work, args) if name == "trellis" else run_spire(work, args, binaries)
            result[name], sockets[name] = stack.enter_context(run)
        progress(f"Workload API latency, {args.rounds} rounds alternating between the agents")
        for name, figures in workload_api(binaries.client, sockets, args).items():
            result[name]["workload_api"] = figures
    result["ratios_trellis_over_spire"] = ratios(result["trellis"], result["spire"])
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(f"{Path(sys.argv[0]).name}: interrupted") from None
