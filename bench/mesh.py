"""The mesh's cost: two sidecars between a client and the echo server, against no sidecar.

    python3 bench/mesh.py [--seconds 8] [--rates 500,1000] [--max-seconds 5] [--bulk-mib 256]

Starts the real processes ``trellis up`` runs (CA server, agent, echo server, two sidecars,
each a separate process), without its load generator: this process drives the traffic
with the same load generator (``trellis.demo.load``: open loop, keep-alive, latency from
the intended send time), once to the load sidecar's upstream port (client → sidecar →
mTLS/HTTP/2 → sidecar → echo) and once to the echo server directly, alternating, with the
same connections, payload and schedule. Every figure carries its baseline from this run:

1. ``latency``: requests/s achieved and p50/p99 latency of 1 KiB HTTP/1.1 POSTs (echoed:
   1 KiB each way) at each offered rate and closed-loop at the maximum; ``added_ms`` is
   mesh minus direct at the same percentile.
2. ``cpu``: CPU seconds per 1,000 requests of each sidecar, from ``/proc/<pid>/stat``
   (utime+stime) around each mesh run, against Istio's published 0.20 vCPU per 1,000
   requests/s at 1 KB (i.e. 0.20 CPU-s per 1,000 requests); the echo server's own CPU per
   1,000 requests is the baseline for what handling a request costs at all.
3. ``bulk``: MB/s of one ``POST /sink`` upload through the mesh vs straight over TCP.
4. ``pooling``: TLS handshakes per app connection, from the sidecars' own metrics.
5. ``reference_proxies``: the same hop through the proxy a user would pick instead, with the
   same load generator, echo server and schedule, interleaved with the runs above: two
   HAProxy processes with mutual TLS between them and pooled HTTP/2 (``reference_proxies``
   says how they are set up, and why ghostunnel is absent). Each row carries the proxy's
   own figures against the same direct run, and ``trellis_over_haproxy`` the ratios:
   added p50/p99, CPU per 1,000 requests of the pair, bulk MB/s (``--no-reference``: skip).

Prints one JSON document. Nothing is asserted; see bench/README.md for recorded figures.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from reference_proxies import GHOSTUNNEL, HaproxyPair, haproxy_binary, haproxy_pair

from trellis.demo.load import LoadConfig, LoadGenerator, LoadReport, bulk_upload
from trellis.up.mesh import Mesh, MeshConfig
from trellis.up.status import scrape

ISTIO_VCPU_PER_1000_RPS = 0.20  # istio.io "Performance and scalability", 1 KB payloads
TICKS = os.sysconf("SC_CLK_TCK")
TARGETS = {"p50_added_ms": 1.0, "p99_added_ms": 5.0, "cpu_s_per_1000": 0.20, "bulk_MB_s": 200.0}


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


async def load(
    address: tuple[str, int], rate: float, seconds: float, connections: int
) -> LoadReport:
    config = LoadConfig(
        address[0], address[1], rate=rate, duration=seconds, size=1024, connections=connections
    )
    return await LoadGenerator(config).run()


def measured(
    mesh: Mesh, target: str, rate: float, seconds: float, connections: int
) -> tuple[LoadReport, dict[str, float]]:
    """One run; returns the client's report and the CPU seconds each process spent in it."""
    pids = {name: mesh.pid(name) for name in ("sidecar-load", "sidecar-echo", "echo")}
    address = mesh.upstream if target == "mesh" else mesh.echo
    return measured_at(address, pids, rate, seconds, connections)


def measured_proxy(
    mesh: Mesh, pair: HaproxyPair, rate: float, seconds: float, connections: int
) -> tuple[LoadReport, dict[str, float]]:
    """One run through the reference proxy pair instead of the sidecars."""
    return measured_at(
        pair.address, {**pair.pids, "echo": mesh.pid("echo")}, rate, seconds, connections
    )


def measured_at(
    address: tuple[str, int], pids: dict[str, int], rate: float, seconds: float, connections: int
) -> tuple[LoadReport, dict[str, float]]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_before = time.process_time()
    report = asyncio.run(load(address, rate, seconds, connections))
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["client"] = time.process_time() - client_before
    return report, cpu


def per_1000(cpu: float, requests: int) -> float | None:
    return round(cpu / requests * 1000, 4) if requests else None


def summarise(
    direct: LoadReport, mesh: LoadReport, cpu: dict[str, float], label: str = "mesh"
) -> dict[str, Any]:
    d, m = direct.latency_ms, mesh.latency_ms
    return {
        "offered_rps": direct.offered_rate or "max",
        "direct": direct.as_dict(),
        label: mesh.as_dict(),
        "added_ms": {p: round(m[p] - d[p], 3) for p in ("p50", "p90", "p99") if p in m and p in d},
        f"{label}_over_direct_rps": round(mesh.achieved_rate / direct.achieved_rate, 3)
        if direct.achieved_rate
        else None,
        "cpu_s_per_1000_requests": {
            name: per_1000(seconds, mesh.ok if name != "echo_direct" else direct.ok)
            for name, seconds in cpu.items()
        },
    }


def pair_cpu(run: dict[str, Any], names: tuple[str, str]) -> float | None:
    values = [run["cpu_s_per_1000_requests"].get(name) for name in names]
    return round(sum(v for v in values if v is not None), 4) if None not in values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def positive_ratio(a: float | None, b: float | None) -> float | None:
    return ratio(a, b) if a is not None and b is not None and a > 0 and b > 0 else None


def reference(
    pair: HaproxyPair,
    runs: list[dict[str, Any]],
    proxy_runs: list[dict[str, Any]],
    bulk: dict[str, list[float]],
) -> dict[str, Any]:
    """The HAProxy pair's figures, and Trellis's over HAProxy's at each offered rate.

    A ratio below 1 means Trellis adds less latency or spends less CPU; for MB/s, above 1
    means Trellis is faster."""
    sidecars, proxies = ("sidecar-load", "sidecar-echo"), ("haproxy-client", "haproxy-server")
    ratios = []
    for mesh_run, proxy_run in zip(runs, proxy_runs, strict=True):
        mesh_cpu, proxy_cpu = pair_cpu(mesh_run, sidecars), pair_cpu(proxy_run, proxies)
        added = {
            p: {"trellis": mesh_run["added_ms"].get(p), "haproxy": proxy_run["added_ms"].get(p)}
            for p in ("p50", "p99")
        }
        ratios.append(
            {
                "offered_rps": mesh_run["offered_rps"],
                # Added latency is a difference of two noisy runs; it can come out at or
                # below zero, where a ratio would mean nothing: None then, figures beside.
                "added_ms": added,
                "added_p50": positive_ratio(added["p50"]["trellis"], added["p50"]["haproxy"]),
                "added_p99": positive_ratio(added["p99"]["trellis"], added["p99"]["haproxy"]),
                "cpu_s_per_1000_requests_of_the_pair": {
                    "trellis_sidecars": mesh_cpu,
                    "haproxy_pair": proxy_cpu,
                    "ratio": ratio(mesh_cpu, proxy_cpu),
                },
                "achieved_rps": ratio(
                    mesh_run["mesh"]["achieved_rps"], proxy_run["haproxy"]["achieved_rps"]
                ),
            }
        )
    mesh_bulk, proxy_bulk = max(bulk["mesh"]), max(bulk["haproxy"])
    return {
        "haproxy": {
            "version": pair.version,
            "setup": "two processes, nbthread 1 each; app HTTP/1.1 -> mTLS (TLS 1.3 on the"
            " system OpenSSL 3.0, so X25519 where the sidecars use X25519MLKEM768;"
            " X509-SVID chains, ALPN h2, http-reuse always) -> echo; chain verification"
            " only (HAProxy 2.6 cannot check a peer's SPIFFE ID)",
            "latency": proxy_runs,
            "bulk_MB_s": round(proxy_bulk, 1),
            "bulk_runs_MB_s": [round(v, 1) for v in bulk["haproxy"]],
        },
        "ghostunnel": GHOSTUNNEL,
        "trellis_over_haproxy": {
            "by_offered_rate": ratios,
            "bulk_MB_s": ratio(mesh_bulk, proxy_bulk),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per offered-rate run")
    parser.add_argument("--rates", default="500,1000", help="offered requests/s, comma-separated")
    parser.add_argument("--max-seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8, help="client connections")
    parser.add_argument("--max-connections", type=int, default=16)
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the HAProxy pair (reference_proxies)"
    )
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r]

    started = time.monotonic()
    config = MeshConfig(svid_ttl=dt.timedelta(hours=1), start_load=False, probe_policy=False)
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": list(os.getloadavg()),
        },
        "payload_bytes": 1024,
    }
    if not args.no_reference:
        haproxy_binary()  # a missing piece ends the run before the mesh starts
    with Mesh(config) as mesh, ExitStack() as stack:
        pair: HaproxyPair | None = None
        if not args.no_reference:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tr-haproxy-")))
            pair = stack.enter_context(haproxy_pair(mesh.echo, scratch))
        # Warm-up: the first pooled TLS connection, code paths, allocator.
        measured(mesh, "mesh", 200, 1.0, args.connections)
        measured(mesh, "direct", 200, 1.0, args.connections)
        if pair is not None:
            measured_proxy(mesh, pair, 200, 1.0, args.connections)
        runs, reference_runs = [], []
        for rate in [*rates, 0.0]:  # 0: closed loop at the maximum
            seconds, connections = (
                (args.seconds, args.connections)
                if rate
                else (args.max_seconds, args.max_connections)
            )
            direct, direct_cpu = measured(mesh, "direct", rate, seconds, connections)
            via, cpu = measured(mesh, "mesh", rate, seconds, connections)
            runs.append(summarise(direct, via, {**cpu, "echo_direct": direct_cpu["echo"]}))
            if pair is not None:
                proxied, proxy_cpu = measured_proxy(mesh, pair, rate, seconds, connections)
                reference_runs.append(
                    summarise(
                        direct, proxied, {**proxy_cpu, "echo_direct": direct_cpu["echo"]}, "haproxy"
                    )
                )
        result["latency"] = runs

        nbytes = args.bulk_mib * 1024 * 1024
        bulk: dict[str, list[float]] = {"direct": [], "mesh": [], "haproxy": []}
        targets = {"direct": mesh.echo, "mesh": mesh.upstream}
        if pair is not None:
            targets["haproxy"] = pair.address
        for _ in range(2):
            for target, address in targets.items():
                seconds = asyncio.run(bulk_upload(address[0], address[1], nbytes))
                bulk[target].append(nbytes / seconds / 1e6)
        result["bulk"] = {
            "bytes": nbytes,
            "direct_MB_s": round(max(bulk["direct"]), 1),
            "mesh_MB_s": round(max(bulk["mesh"]), 1),
            "mesh_over_direct": round(max(bulk["mesh"]) / max(bulk["direct"]), 3),
            "runs_MB_s": {k: [round(v, 1) for v in vs] for k, vs in bulk.items() if k != "haproxy"},
        }
        if pair is not None:
            result["reference_proxies"] = reference(pair, runs, reference_runs, bulk)
        else:
            result["reference_proxies"] = {"skipped": "--no-reference"}

        caller = scrape(mesh.url("load_admin"))
        callee = scrape(mesh.url("echo_admin"))
        if caller is not None and callee is not None:
            handshakes = caller.sum("trellis_sidecar_tls_handshakes_total", direction="outbound")
            app = caller.sum("trellis_sidecar_app_connections_total", direction="outbound")
            groups = caller.by_label("tls_group_total", "group")
            result["pooling"] = {
                "app_connections": int(app),
                "tls_handshakes": int(handshakes),
                "handshakes_per_app_connection": round(handshakes / app, 4) if app else None,
                "inbound_handshakes_at_echo": int(
                    callee.sum("trellis_sidecar_tls_handshakes_total", direction="inbound")
                ),
                "groups": {k: int(v) for k, v in groups.items() if v},
            }

    at_1000 = next((r for r in runs if r["offered_rps"] == 1000.0), None)
    sidecar_cpu = [
        value
        for r in runs
        if r["offered_rps"] != "max"
        for name, value in r["cpu_s_per_1000_requests"].items()
        if name.startswith("sidecar") and value is not None
    ]
    result["targets"] = {
        "added_p50_ms_at_1000": {
            "target": TARGETS["p50_added_ms"],
            "measured": at_1000["added_ms"].get("p50") if at_1000 else None,
        },
        "added_p99_ms_at_1000": {
            "target": TARGETS["p99_added_ms"],
            "measured": at_1000["added_ms"].get("p99") if at_1000 else None,
        },
        "sidecar_cpu_s_per_1000_requests": {
            "target": TARGETS["cpu_s_per_1000"],
            "istio_envoy_published": ISTIO_VCPU_PER_1000_RPS,
            "measured_worst": max(sidecar_cpu) if sidecar_cpu else None,
        },
        "bulk_MB_s": {"target": TARGETS["bulk_MB_s"], "measured": result["bulk"]["mesh_MB_s"]},
    }
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
