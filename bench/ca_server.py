"""CA server throughput and latency over the real gRPC mTLS API; prints JSON.

Starts a real ``trellis ca serve`` process on loopback, attests N agents with join tokens,
then measures:

* ``batch``: X509-SVIDs/s with N agents each sending batches of CSRs back to back;
* ``single``: X509-SVIDs/s with N agents each keeping several one-CSR requests in flight
  on its signing stream (``StreamX509SVIDs``, which ``CaClient`` uses);
* ``single_unary``: the same with one unary ``BatchNewX509SVID`` call per CSR, as agents
  do with a CA that lacks the stream;
* ``latency``: p50/p99 of one-CSR requests at fixed offered loads (open loop: requests
  are sent on schedule whether or not earlier ones have finished);
* ``latency ... agent_batched``: the same arrivals through each agent's ``Batcher`` (the
  agent's group commit, ``ca.agent.batcher``), p50/p99 from arrival to response;
* ``latency ... agent_batched_processes``: the same again with the agents spread over
  ``--client-processes`` load-generator processes, as real agents each have their own:
  one process playing 8 agents at 1,000 SVIDs/s is itself over half a core busy, and its
  event-loop delays would count as the CA's latency;
* ``in_process``: ``IntermediateAuthority.issue_x509_svid_from_csr`` on the same CSRs in
  this process, the ceiling that the gRPC figures are compared with (``ratio``);
* ``grpc_echo_floor``: the ``single`` closed loop against a grpc.aio server that only
  answers (plain TCP), i.e. what grpcio's per-call cost alone allows on this machine; the
  ceiling for ``single_unary``;
* ``grpc_echo_stream_floor``: the same with the requests as messages on one stream per
  agent, the ceiling for ``single``.

CSRs are made before timing starts (an agent makes them off the CA's critical path), so
the client's cost is the gRPC call alone. Client and server share the machine's cores.

    python bench/ca_server.py [--agents 8] [--duration 5] [--loads 250,500,1000]
                              [--sign-workers auto|N] [--client-processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ca import (  # noqa: E402
    JwtAuthority,
    KeyAlgorithm,
    RootAuthority,
    TrustDomain,
    generate_private_key,
)
from ca.agent.batcher import Batcher  # noqa: E402
from ca.agent.rotator import MAX_BATCH, MAX_IN_FLIGHT  # noqa: E402
from ca.agent.upstream import UpstreamError  # noqa: E402
from ca.api import CaClient, CaError, build_csr  # noqa: E402
from ca.store import CaStore  # noqa: E402
from core.eventloop import install_uvloop, settle_heap  # noqa: E402

CLUSTER = "bench"
SERVER_PID = [0]
SIGN_WORKERS = ["auto"]
LOAD_AT_START: list[float] = []
ENTRIES = """\
entries:
  - id: workload
    spiffe_id: spiffe://bench.example/ns/default/sa/workload
    selectors: [unix:uid:1000]
    nodes: ["*"]
"""


def make_ca(directory: Path) -> CaStore:
    now = dt.datetime.now(dt.UTC)
    store = CaStore(directory)
    root = RootAuthority.create(TrustDomain("bench.example"), now=now)
    store.save_root(root, b"bench-passphrase")
    store.save_intermediate(root.issue_intermediate(CLUSTER, now=now), JwtAuthority.generate())
    (directory / "entries.yaml").write_text(ENTRIES)
    return store


def start_server(directory: Path, agents: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    args = [
        sys.executable, "-m", "trellis", "ca", "serve",
        "--dir", str(directory), "--cluster", CLUSTER,
        "--listen", "127.0.0.1:0", "--attest-listen", "127.0.0.1:0",
        "--bundle-listen", "off", "--metrics-listen", "127.0.0.1:0",
        "--entries", str(directory / "entries.yaml"),
        "--agent-rate", "1000000", "--agent-burst", "1000000",
        "--log-level", "error", "--sign-workers", str(SIGN_WORKERS[0]),
    ]  # fmt: skip
    for index in range(agents):
        args += ["--join-token", f"node-{index}"]
    args.append("--print-join-tokens")
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO)
    SERVER_PID[0] = process.pid
    assert process.stdout is not None
    ready = json.loads(process.stdout.readline())
    tokens = {}
    for _ in range(agents):
        line = json.loads(process.stdout.readline())
        tokens[line["node"]] = line["token"]
    ready["tokens"] = tokens
    return process, ready


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live descendants (the server's signing
    workers), from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += cpu_seconds(int(child))
    return total


def system_busy_seconds() -> float:
    """CPU time every process on the machine has used (/proc/stat, all cores)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def attest_all(ready: dict[str, Any], roots: bytes, agents: int) -> list[CaClient]:
    clients = []
    for index in range(agents):
        token = ready["tokens"][f"node-{index}"]
        client = CaClient(ready["listen"], attest_address=ready["attest_listen"], trust_roots=roots)
        await client.attest_with_join_token(token)
        clients.append(client)
    return clients


async def closed_loop(
    clients: list[CaClient], csrs: list[bytes], batch: int, in_flight: int, duration: float
) -> dict[str, Any]:
    issued = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    async def worker(client: CaClient, offset: int) -> None:
        nonlocal issued
        i = offset
        while time.perf_counter() < deadline:
            requests = [("workload", csrs[(i + k) % len(csrs)]) for k in range(batch)]
            i += batch
            started = time.perf_counter()
            svids = await client.batch_sign_csrs(requests)
            latencies.append(time.perf_counter() - started)
            issued += len(svids)

    server_cpu = cpu_seconds(SERVER_PID[0])
    client_cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(
        *(
            worker(client, (n * in_flight + k) * 7)
            for n, client in enumerate(clients)
            for k in range(in_flight)
        )
    )
    elapsed = time.perf_counter() - started
    server_cpu = cpu_seconds(SERVER_PID[0]) - server_cpu
    client_cpu = time.process_time() - client_cpu
    return {
        "agents": len(clients),
        "batch_size": batch,
        "in_flight_per_agent": in_flight,
        "svids": issued,
        "seconds": round(elapsed, 3),
        "svids_per_second": round(issued / elapsed, 1),
        "call_latency_ms_p50": round(percentile(latencies, 0.50) * 1000, 2),
        "call_latency_ms_p99": round(percentile(latencies, 0.99) * 1000, 2),
        "server_cpu_us_per_svid": round(1e6 * server_cpu / max(issued, 1), 1),
        "client_cpu_us_per_svid": round(1e6 * client_cpu / max(issued, 1), 1),
    }


async def open_loop(
    clients: list[CaClient], csrs: list[bytes], rate: float, duration: float
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    codes: dict[str, int] = {}
    total = int(rate * duration)
    interval = 1.0 / rate
    tasks: list[asyncio.Task[None]] = []

    async def one(client: CaClient, csr: bytes) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            await client.batch_sign_csrs([("workload", csr)])
        except CaError as exc:  # a bench counts failures instead of stopping
            errors += 1
            codes[exc.code] = codes.get(exc.code, 0) + 1
            return
        latencies.append(time.perf_counter() - started)

    start = time.perf_counter()
    for index in range(total):
        target = start + index * interval
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        client = clients[index % len(clients)]
        tasks.append(asyncio.create_task(one(client, csrs[index % len(csrs)])))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return {
        "offered_per_second": rate,
        "requests": total,
        "completed_per_second": round(len(latencies) / elapsed, 1),
        "errors": errors,
        "error_codes": codes,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2) if latencies else None,
    }


async def batched_schedule(
    clients: list[CaClient],
    csrs: list[bytes],
    rate: float,
    duration: float,
    in_flight: int,
    *,
    share: int = 0,
    shares: int = 1,
    start: float | None = None,
) -> dict[str, Any]:
    """Open-loop arrivals at ``rate`` for ``duration`` (every ``shares``-th one from
    ``share`` on, when several processes split the schedule), round-robin over the agents,
    each SVID through its agent's ``Batcher`` -- the agent's own group commit, the class its
    rotator uses: at most ``in_flight`` calls in flight per agent, what arrives meanwhile
    rides the next call, no timer. Latency runs from an SVID's scheduled arrival to its
    response, so it includes any wait for a free call slot."""
    batchers: list[Batcher[tuple[str, bytes], Any]] = [
        Batcher(c.batch_sign_csrs, max_batch=MAX_BATCH, max_in_flight=in_flight) for c in clients
    ]
    latencies: list[float] = []
    codes: dict[str, int] = {}
    tasks: list[asyncio.Task[None]] = []

    async def one(batcher: Batcher[tuple[str, bytes], Any], csr: bytes, arrival: float) -> None:
        try:
            await batcher.submit(("workload", csr))
        except (CaError, UpstreamError) as exc:  # a bench counts failures instead of stopping
            code = exc.code if isinstance(exc, CaError) else exc.reason
            codes[code] = codes.get(code, 0) + 1
            return
        latencies.append(time.perf_counter() - arrival)

    client_cpu = time.process_time()
    start = time.perf_counter() if start is None else start
    for n, index in enumerate(range(share, int(rate * duration), shares)):
        arrival = start + index / rate
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        batcher = batchers[n % len(batchers)]
        tasks.append(asyncio.create_task(one(batcher, csrs[index % len(csrs)], arrival)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    for batcher in batchers:
        await batcher.close()
    return {
        "latencies": latencies,
        "codes": codes,
        "calls": sum(b.calls_sent for b in batchers),
        "items": sum(b.items_sent for b in batchers),
        "client_cpu": time.process_time() - client_cpu,
        "elapsed": elapsed,
    }


def batched_report(
    rate: float, in_flight: int, parts: list[dict[str, Any]], server_cpu: float
) -> dict[str, Any]:
    """One result from the ``batched_schedule`` shares of one run."""
    latencies = [x for part in parts for x in part["latencies"]]
    codes: dict[str, int] = {}
    for part in parts:
        for code, count in part["codes"].items():
            codes[code] = codes.get(code, 0) + count
    calls = sum(p["calls"] for p in parts)
    items = sum(p["items"] for p in parts)
    client_cpu = sum(p["client_cpu"] for p in parts)
    done = max(len(latencies), 1)
    return {
        "offered_per_second": rate,
        "calls_in_flight_per_agent": in_flight,
        "svids": len(latencies),
        "calls": calls,
        "mean_batch": round(items / calls, 2) if calls else None,
        "completed_per_second": round(len(latencies) / max(p["elapsed"] for p in parts), 1),
        "errors": sum(codes.values()),
        "error_codes": codes,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2) if latencies else None,
        "server_cpu_us_per_svid": round(1e6 * server_cpu / done, 1),
        "client_cpu_us_per_svid": round(1e6 * client_cpu / done, 1),
        "client_cpu_seconds": round(client_cpu, 3),
    }


async def open_loop_batched(
    clients: list[CaClient], csrs: list[bytes], rate: float, duration: float, in_flight: int
) -> dict[str, Any]:
    """``batched_schedule`` with every agent in this process."""
    server_cpu = cpu_seconds(SERVER_PID[0])
    part = await batched_schedule(clients, csrs, rate, duration, in_flight)
    server_cpu = cpu_seconds(SERVER_PID[0]) - server_cpu
    return batched_report(rate, in_flight, [part], server_cpu)


ECHO_METHOD = "/trellis.bench.Echo/Call"
ECHO_STREAM_METHOD = "/trellis.bench.Echo/Stream"


async def echo_server_main() -> None:
    """``--echo-server``: a grpc.aio server whose one unary method answers each request
    with a fixed reply the size of one signed SVID chain; prints its port."""
    import grpc

    reply = b"\x5a" * 1100

    async def call(request: bytes, context: Any) -> bytes:
        return reply

    async def stream(requests: Any, context: Any) -> Any:
        async for _ in requests:
            yield reply

    def identity(data: bytes) -> bytes:
        return data

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handlers = {
        "Call": grpc.unary_unary_rpc_method_handler(call, identity, identity),
        "Stream": grpc.stream_stream_rpc_method_handler(stream, identity, identity),
    }
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("trellis.bench.Echo", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def echo_floor(
    agents: int, in_flight: int, duration: float, *, stream: bool = False
) -> dict[str, Any]:
    """What one unary call costs grpcio itself on this machine: the same closed loop as
    ``single_unary`` (``agents`` channels, ``in_flight`` calls each, a CSR-sized request),
    against a server that does nothing but answer. Plain TCP, so an upper bound for the
    mTLS API. ``stream``: the requests go as messages on one stream per channel, at most
    ``in_flight`` unanswered, as ``single`` sends them."""
    import grpc

    process = subprocess.Popen(
        [sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(agents)]
        request = b"\xa5" * 300
        calls: list[Any] = [c.unary_unary(ECHO_METHOD) for c in channels]
        for call in calls:
            await call(request)
        done = 0
        deadline = time.perf_counter() + duration

        async def worker(call: Any) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await call(request)
                done += 1

        async def streamer(channel: Any) -> None:
            call = channel.stream_stream(ECHO_STREAM_METHOD)()
            credit = asyncio.Semaphore(in_flight)

            async def reader() -> None:
                nonlocal done
                while await call.read() is not grpc.aio.EOF:
                    done += 1
                    credit.release()

            reading = asyncio.create_task(reader())
            while time.perf_counter() < deadline:
                await credit.acquire()
                await call.write(request)
            await call.done_writing()
            await reading

        server_cpu, client_cpu = cpu_seconds(process.pid), time.process_time()
        started = time.perf_counter()
        if stream:
            await asyncio.gather(*(streamer(channel) for channel in channels))
        else:
            await asyncio.gather(*(worker(call) for call in calls for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
        server_cpu = cpu_seconds(process.pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
        for channel in channels:
            await channel.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
    return {
        "agents": agents,
        "in_flight_per_agent": in_flight,
        "calls_per_second": round(done / elapsed, 1),
        "server_cpu_us_per_call": round(1e6 * server_cpu / max(done, 1), 1),
        "client_cpu_us_per_call": round(1e6 * client_cpu / max(done, 1), 1),
        "server_cpu_seconds": round(server_cpu, 3),
    }


def _batched_child(
    ready: dict[str, Any],
    tokens: list[str],
    roots: bytes,
    csrs: list[bytes],
    rate: float,
    duration: float,
    in_flight: int,
    share: int,
    shares: int,
    start_at: float,
) -> dict[str, Any]:
    """One load-generator process of ``open_loop_batched_processes``: its own agents
    (attested with ``tokens``), its share of the schedule, from wall-clock ``start_at``."""

    async def run() -> dict[str, Any]:
        clients = []
        for token in tokens:
            client = CaClient(
                ready["listen"], attest_address=ready["attest_listen"], trust_roots=roots
            )
            await client.attest_with_join_token(token)
            clients.append(client)
        for _ in range(3):  # connections up, caches warm
            await asyncio.gather(*(c.batch_sign_csrs([("workload", csrs[0])]) for c in clients))
        settle_heap()
        start = time.perf_counter() + max(0.0, start_at - time.time())
        part = await batched_schedule(
            clients, csrs, rate, duration, in_flight, share=share, shares=shares, start=start
        )
        for client in clients:
            await client.close()
        return part

    install_uvloop()  # as the agent does (core.eventloop)
    return asyncio.run(run())


async def open_loop_batched_processes(
    ready: dict[str, Any],
    tokens: list[str],
    roots: bytes,
    csrs: list[bytes],
    rate: float,
    duration: float,
    in_flight: int,
    processes: int,
) -> dict[str, Any]:
    """``open_loop_batched`` with the agents spread over ``processes`` load-generator
    processes. Real agents each have their own process (on their own node); one process
    playing all of them at 1,000 SVIDs/s spends over half a core and its own event-loop
    delays would be counted as the CA's latency."""
    import concurrent.futures
    import multiprocessing

    shares = [tokens[k::processes] for k in range(processes)]
    start_at = time.time() + 6.0  # every child has attested and warmed up by then
    context = multiprocessing.get_context("spawn")
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        loop = asyncio.get_running_loop()
        futures = [
            loop.run_in_executor(
                pool,
                _batched_child,
                ready,
                share,
                roots,
                csrs,
                rate,
                duration,
                in_flight,
                k,
                processes,
                start_at,
            )
            for k, share in enumerate(shares)
        ]
        await asyncio.sleep(max(0.0, start_at - time.time()))
        server_cpu = cpu_seconds(SERVER_PID[0])
        parts = await asyncio.gather(*futures)
        server_cpu = cpu_seconds(SERVER_PID[0]) - server_cpu
    # The pool's processes are the only children reaped meanwhile: their whole CPU time,
    # start-up and attestation included, for machine.other_processes_cpu_cores.
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = after.ru_utime + after.ru_stime - reaped.ru_utime - reaped.ru_stime
    report = batched_report(rate, in_flight, list(parts), server_cpu)
    return {
        "load_generator_processes": processes,
        "agents": len(tokens),
        **report,
        "load_generator_cpu_seconds": round(spent, 3),
    }


def in_process_rate(store: CaStore, csrs: list[bytes], duration: float) -> dict[str, Any]:
    intermediate = store.load_intermediate(CLUSTER)
    spiffe_id = "spiffe://bench.example/ns/default/sa/workload"
    now = dt.datetime.now(dt.UTC)
    count = 0
    started = time.perf_counter()
    deadline = started + duration
    while time.perf_counter() < deadline:
        for csr in csrs[:50]:
            intermediate.issue_x509_svid_from_csr(csr, spiffe_id, now=now)
        count += 50
    elapsed = time.perf_counter() - started
    return {"svids": count, "svids_per_second": round(count / elapsed, 1)}


async def run_grpc(ready: dict[str, Any], roots: bytes, csrs: list[bytes], args: Any) -> Any:
    clients = await attest_all(ready, roots, args.agents)
    settle_heap()  # as a real agent does once it has started (core.eventloop)
    # warm-up: connections, TLS sessions, server caches
    await closed_loop(clients, csrs, 10, 1, 0.5)
    batch = await closed_loop(clients, csrs, args.batch_size, 1, args.duration)
    single = await closed_loop(clients, csrs, 1, args.in_flight, args.duration)
    for client in clients:
        client.signing_stream = False
    single_unary = await closed_loop(clients, csrs, 1, args.in_flight, args.duration)
    for client in clients:
        client.signing_stream = True
    latency = []
    coalesced = []
    for rate in args.loads:
        latency.append(await open_loop(clients, csrs, rate, args.latency_duration))
        await asyncio.sleep(0.5)
        coalesced.append(
            await open_loop_batched(
                clients, csrs, rate, args.latency_duration, args.batched_in_flight
            )
        )
        await asyncio.sleep(0.5)
    for client in clients:
        await client.close()
    spread = []
    if args.client_processes > 1:
        for round_, rate in enumerate(args.loads, start=1):
            # Join tokens are single-use: each round's processes attest agents of their own.
            first = round_ * args.agents
            tokens = [ready["tokens"][f"node-{first + i}"] for i in range(args.agents)]
            spread.append(
                await open_loop_batched_processes(
                    ready,
                    tokens,
                    roots,
                    csrs,
                    rate,
                    args.latency_duration,
                    args.batched_in_flight,
                    args.client_processes,
                )
            )
    floor = await echo_floor(len(clients), args.in_flight, args.duration)
    stream_floor = await echo_floor(len(clients), args.in_flight, args.duration, stream=True)
    return batch, single, single_unary, latency, coalesced, spread, floor, stream_floor


def server_metrics(address: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = {}
    for line in text.splitlines():
        if line.startswith("trellis_ca_sign_duration_seconds_sum") and 'kind="workload"' in line:
            wanted["sign_seconds_sum"] = float(line.rsplit(" ", 1)[1])
        if line.startswith("trellis_ca_sign_duration_seconds_count") and 'kind="workload"' in line:
            wanted["sign_count"] = float(line.rsplit(" ", 1)[1])
    return wanted


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--latency-duration", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--in-flight", type=int, default=8, help="single-CSR calls per agent")
    parser.add_argument("--sign-workers", default="auto", help="server --sign-workers")
    parser.add_argument(
        "--batched-in-flight",
        type=positive_int,
        default=MAX_IN_FLIGHT,
        help="agent-batched mode: calls in flight per agent (the agent's own: %(default)s)",
    )
    parser.add_argument(
        "--loads", type=lambda s: [float(x) for x in s.split(",")], default=[250, 500, 1000]
    )
    parser.add_argument(
        "--client-processes",
        type=positive_int,
        default=2,
        help="agent-batched runs again with the agents spread over this many load-generator "
        "processes (1: skip); default %(default)s",
    )
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        install_uvloop()  # as ca serve does
        asyncio.run(echo_server_main())
        return
    SIGN_WORKERS[0] = args.sign_workers
    LOAD_AT_START[:] = [round(x, 2) for x in os.getloadavg()]

    directory = Path(tempfile.mkdtemp(prefix="trellis-bench-ca-"))
    process = None
    try:
        store = make_ca(directory)
        csrs = [build_csr(generate_private_key(KeyAlgorithm.P256)) for _ in range(256)]
        in_process = in_process_rate(store, csrs, min(args.duration, 3.0))
        # Tokens for the agents of this process, and as many again for each round of the
        # load-generator processes.
        rounds = len(args.loads) if args.client_processes > 1 else 0
        process, ready = start_server(directory, (1 + rounds) * args.agents)
        roots = store.root_cert_path.read_bytes()
        # Whatever else ran meanwhile: all CPU used on the machine minus this benchmark's
        # own (client and server with its workers), in cores. Figures taken while this is
        # well above 0 were measured on a loaded machine.
        busy, ours, began = system_busy_seconds(), cpu_seconds(process.pid), time.perf_counter()
        client_began = time.process_time()
        install_uvloop()  # as the agent does (core.eventloop)
        results = asyncio.run(run_grpc(ready, roots, csrs, args))
        batch, single, single_unary, latency, coalesced, spread, floor, stream_floor = results
        ours = cpu_seconds(process.pid) - ours + time.process_time() - client_began
        ours += floor["server_cpu_seconds"] + stream_floor["server_cpu_seconds"]
        ours += sum(r["load_generator_cpu_seconds"] for r in spread)
        others = (system_busy_seconds() - busy - ours) / (time.perf_counter() - began)
        metrics = server_metrics(ready["metrics_listen"])
        mean_sign_us = (
            1e6 * metrics["sign_seconds_sum"] / metrics["sign_count"]
            if metrics.get("sign_count")
            else None
        )
        at_1000 = next((r for r in latency if r["offered_per_second"] == 1000), None)
        batched_1000 = next((r for r in coalesced if r["offered_per_second"] == 1000), None)
        spread_1000 = next((r for r in spread if r["offered_per_second"] == 1000), None)
        report = {
            "benchmark": "ca_server",
            "machine": {
                "cpus": os.cpu_count(),
                "load_average_at_start": LOAD_AT_START,
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                "other_processes_cpu_cores": round(others, 2),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "server_sign_workers": SIGN_WORKERS[0],
            "in_process": in_process,
            "grpc_batch": batch,
            "grpc_single": single,
            "grpc_single_unary": single_unary,
            "grpc_echo_floor": floor,
            "grpc_echo_stream_floor": stream_floor,
            "latency_at_offered_load": latency,
            "latency_at_offered_load_agent_batched": coalesced,
            "latency_at_offered_load_agent_batched_processes": spread,
            "server_mean_sign_us": round(mean_sign_us, 1) if mean_sign_us else None,
            "ratio_batch_to_in_process": round(
                batch["svids_per_second"] / in_process["svids_per_second"], 3
            ),
            "ratio_single_to_in_process": round(
                single["svids_per_second"] / in_process["svids_per_second"], 3
            ),
            "ratio_single_to_echo_stream_floor": round(
                single["svids_per_second"] / stream_floor["calls_per_second"], 3
            ),
            "ratio_single_unary_to_echo_floor": round(
                single_unary["svids_per_second"] / floor["calls_per_second"], 3
            ),
            "ratio_single_to_single_unary": round(
                single["svids_per_second"] / single_unary["svids_per_second"], 3
            ),
            "targets": {
                "grpc_svids_per_second_min": 2000,
                "batch_met": batch["svids_per_second"] >= 2000,
                "single_met": single["svids_per_second"] >= 2000,
                "single_unary_met": single_unary["svids_per_second"] >= 2000,
                "p99_ms_at_1000_per_second_max": 50,
                "p99_met_single_calls": at_1000 is not None and at_1000["p99_ms"] <= 50,
                "p99_met_agent_batched": batched_1000 is not None and batched_1000["p99_ms"] <= 50,
                "p99_met_agent_batched_processes": spread_1000 is not None
                and spread_1000["p99_ms"] <= 50,
            },
        }
        print(json.dumps(report, indent=2))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
