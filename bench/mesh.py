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
6. ``first_byte``: what 0-RTT saves on a fresh pooled connection. A caller sidecar and a
   callee sidecar (their real data paths: `Outbound`, `PoolSet`, `Inbound`, the engine,
   loopback sockets) in this process, the callee holding a STEK ring, the upstream
   declared HTTP, and a relay between them that delays each direction by half of
   ``--rtt-ms`` (loopback has no round trip to save). Each round closes the pooled
   connection and times an app's GET from its connect to the first response byte, three
   ways interleaved: a full handshake (no ticket), a resumed 1-RTT handshake (ticket,
   early data off) and 0-RTT (ticket, the GET in early data); ``--app-ms`` gives the app
   time to spend per request. The callee answers an early GET as 0.5-RTT data, from its
   own Finished on without waiting for the caller's (RFC 8446 §2.3), so 0-RTT saves the
   round trip that carries the request after the handshake, as well as the app's time up
   to one round trip. ``--first-byte-only`` runs this part alone (no processes).

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

from ca import TrustDomain
from ca.authority import RootAuthority
from ca.keys import KeyAlgorithm, generate_private_key
from sidecar.config import Address, InboundConfig, InboundTarget, PoolConfig, UpstreamConfig
from sidecar.identity import Identity, Svid
from sidecar.inbound import Inbound
from sidecar.metrics import Metrics
from sidecar.outbound import Outbound
from sidecar.policy import Authorizer
from sidecar.pool import PoolSet
from sidecar.tls.tickets import Stek, StekRing
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


# --- first_byte: 0-RTT against a full and a resumed 1-RTT handshake -------------------------

GET = b"GET /first-byte HTTP/1.1\r\nHost: callee\r\n\r\n"
FIRST_BYTE_MODES = ("full", "resumed_1rtt", "zero_rtt")


class _App(asyncio.Protocol):
    """Answers a request head after `think` seconds (an app's own work per request)."""

    def __init__(self, think: float) -> None:
        self.think = think

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            asyncio.get_running_loop().call_later(self.think, self._answer)

    def _answer(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # type: ignore[attr-defined]


class _Relay:
    def __init__(self, server: asyncio.Server, tasks: set[asyncio.Task[Any]]) -> None:
        self.server = server
        self.port: int = server.sockets[0].getsockname()[1]
        self.tasks = tasks

    async def close(self) -> None:
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _delayed_relay(target: tuple[str, int], one_way: float) -> _Relay:
    """A TCP relay holding each chunk `one_way` seconds in each direction (in order)."""
    tasks: set[asyncio.Task[Any]] = set()

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                dst.write(data)
            dst.close()

        task = asyncio.create_task(deliver())
        try:
            while data := await src.read(65536):
                queue.put_nowait((loop.time() + one_way, data))
        except OSError:
            pass
        queue.put_nowait((0.0, b""))
        await task

    async def pumps(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Tasks of our own, not the server's, so that close() can end them cleanly.
        task = asyncio.get_running_loop().create_task(pumps(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return _Relay(await asyncio.start_server(relay, "127.0.0.1", 0), tasks)


def _identity(intermediate: Any, root: Any, name: str) -> Identity:
    key = generate_private_key(KeyAlgorithm.P256)
    issued = intermediate.issue_x509_svid(
        f"spiffe://bench.example/ns/demo/sa/{name}", key.public_key(), now=dt.datetime.now(dt.UTC)
    )
    identity = Identity()
    svid = Svid(issued.spiffe_id, issued.chain, key)
    identity.update(svid, {"bench.example": (root.certificate,)})
    return identity


async def _first_byte(port: int) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET)
    await reader.readexactly(1)
    elapsed = time.perf_counter() - started
    writer.close()
    return elapsed


async def first_byte(rounds: int, rtt_ms: float, app_ms: float) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    root = RootAuthority.create(TrustDomain("bench.example"), now=now)
    intermediate = root.issue_intermediate("bench", now=now)
    loop = asyncio.get_running_loop()
    app = await loop.create_server(lambda: _App(app_ms / 1000), "127.0.0.1", 0)
    callee = _identity(intermediate, root, "callee")
    ring = StekRing()
    t = time.time()
    ring.install(Stek(os.urandom(16), os.urandom(32), t - 60, t + 3600), (), None)
    callee.ticket_ring = ring
    callee_metrics = Metrics()
    inbound = Inbound(
        InboundConfig(
            listen=Address("127.0.0.1", 0),
            targets={
                8080: InboundTarget(
                    8080, Address("127.0.0.1", app.sockets[0].getsockname()[1]), None
                )
            },
        ),
        callee,
        callee_metrics,
        lambda: Authorizer(http_ports=frozenset({8080})),
    )
    await inbound.start()
    inbound_port = inbound.servers[0].sockets[0].getsockname()[1]
    relay = await _delayed_relay(("127.0.0.1", inbound_port), rtt_ms / 2000)
    relay_port = relay.port
    caller = _identity(intermediate, root, "caller")
    caller_metrics = Metrics()
    pools = PoolSet(caller, caller_metrics, PoolConfig())
    ports: dict[str, int] = {}
    for mode in ("resumed_1rtt", "zero_rtt"):
        outbound = (
            Outbound(pools, caller_metrics, 8080)
            if mode == "zero_rtt"
            else Outbound(pools, caller_metrics, 8080, early_data=None)
        )
        upstream = UpstreamConfig(
            mode,
            Address("127.0.0.1", 0),
            "callee:8080",
            (Address("127.0.0.1", relay_port),),
            (),
            "http",
        )
        await outbound.listen_upstream(upstream)
        ports[mode] = outbound.servers[0].sockets[0].getsockname()[1]
    ports["full"] = ports["resumed_1rtt"]

    async def forget() -> None:
        for pool in pools.pools.values():
            for session in list(pool.sessions):
                session.close()
        while any(pool.sessions for pool in pools.pools.values()):
            await asyncio.sleep(0.005)

    async def has_ticket() -> None:
        deadline = loop.time() + 5
        while not len(caller.tickets) and loop.time() < deadline:
            await asyncio.sleep(0.005)

    samples: dict[str, list[float]] = {mode: [] for mode in FIRST_BYTE_MODES}
    await _first_byte(ports["full"])  # warm-up
    for _ in range(rounds):
        for mode in FIRST_BYTE_MODES:
            await forget()
            if mode == "full":
                caller.tickets.clear()
            else:
                await has_ticket()
            samples[mode].append(await _first_byte(ports[mode]))
    early = {
        outcome: callee_metrics.registry.get_sample_value(
            "tls_early_data_total", {"outcome": outcome}
        )
        for outcome in ("accepted", "rejected")
    }
    resumed = callee_metrics.registry.get_sample_value("tls_resumption_total", {"kind": "ticket"})
    await forget()
    await relay.close()
    inbound.drain()
    app.close()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    p50 = {mode: pct(samples[mode], 0.5) for mode in FIRST_BYTE_MODES}
    return {
        "rtt_ms": rtt_ms,
        "app_ms": app_ms,
        "rounds": rounds,
        "p50_ms": p50,
        "p90_ms": {mode: pct(samples[mode], 0.9) for mode in FIRST_BYTE_MODES},
        "zero_rtt_saves_ms_vs_full": round(p50["full"] - p50["zero_rtt"], 3),
        "zero_rtt_saves_ms_vs_resumed_1rtt": round(p50["resumed_1rtt"] - p50["zero_rtt"], 3),
        "callee_early_data": early,
        "callee_resumed_handshakes": resumed,
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
    parser.add_argument("--rtt-ms", type=float, default=10.0, help="first_byte: simulated RTT")
    parser.add_argument("--first-byte-rounds", type=int, default=30)
    parser.add_argument(
        "--app-ms", type=float, default=0.0, help="first_byte: the app's time per request"
    )
    parser.add_argument(
        "--first-byte-only", action="store_true", help="only the first_byte part, in-process"
    )
    args = parser.parse_args()
    if args.first_byte_only:
        report = asyncio.run(first_byte(args.first_byte_rounds, args.rtt_ms, args.app_ms))
        print(json.dumps({"first_byte": report}, indent=2))
        return 0
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
    result["first_byte"] = asyncio.run(first_byte(args.first_byte_rounds, args.rtt_ms, args.app_ms))
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
