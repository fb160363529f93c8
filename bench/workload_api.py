"""Cached Workload API latency over the agent's Unix socket, against bare grpcio baselines.

Prints JSON. Three processes are measured from this one, each over a real Unix socket with
a persistent channel, calls strictly one after another (latency, not throughput):

* ``fetch_x509_svid``: a real ``trellis agent`` (``--local-ca``, so no CA process adds
  noise): open FetchX509SVID, read the first (full, cached) response, cancel. This is what
  ``spire-agent api fetch``-style callers and py-spiffe's ``fetch_x509_svid`` do.
* ``fetch_jwt_svid``: FetchJWTSVID for one audience, served from the agent's JWT cache.
* ``baseline_echo_direct``: a bare grpcio server echoing 0 bytes over a Unix socket: the
  floor any Python gRPC service pays (HTTP/2, the grpcio poller, a Python handler).
* ``baseline_echo_via_front``: the same echo behind the agent's SO_PEERCRED front
  (``ca.agent.peercred.UdsFront``), isolating what the splice costs.

    python bench/workload_api.py [--calls 2000] [--warmup 200]

Target (issue 4): cached fetch p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ca import JwtAuthority, RootAuthority, TrustDomain  # noqa: E402
from ca.store import CaStore  # noqa: E402
from ca.workload import HEADER_KEY, HEADER_VALUE, method_path, workload_pb2  # noqa: E402

METADATA = ((HEADER_KEY, HEADER_VALUE),)

ECHO_SERVER = r"""
import asyncio, sys
from pathlib import Path
import grpc, grpc.aio
from ca.agent.peercred import UdsFront

async def main(path: str, front: bool) -> None:
    async def echo(request, context):
        return request
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    if front:
        uds = UdsFront(Path(path))
        server.add_insecure_port(uds.internal_address)
        await server.start()
        await uds.start()
    else:
        server.add_insecure_port(f"unix:{path}")
        await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main(sys.argv[1], sys.argv[2] == "front"))
"""


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "calls": len(ordered),
        "p50_ms": round(pick(0.50) * 1000, 3),
        "p90_ms": round(pick(0.90) * 1000, 3),
        "p99_ms": round(pick(0.99) * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


def measure(call: Callable[[], object], calls: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def wait_socket(path: Path, process: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(
                f"{path} never appeared: {process.stderr.read() if process.stderr else ''}"
            )
        time.sleep(0.05)


def start_agent(work: Path) -> tuple[subprocess.Popen[str], Path]:
    now = dt.datetime.now(dt.UTC)
    store = CaStore(work / "ca")
    root = RootAuthority.create(TrustDomain("example.org"), now=now)
    store.save_root(root, b"bench-passphrase")
    store.save_intermediate(root.issue_intermediate("bench", now=now), JwtAuthority.generate())
    (work / "entries.yaml").write_text(
        "entries:\n"
        "  - spiffe_id: spiffe://example.org/ns/default/sa/web\n"
        f"    selectors: [unix:uid:{os.getuid()}]\n"
        "    nodes: ['*']\n"
    )
    sock = work / "agent.sock"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trellis",
            "agent",
            "--local-ca",
            str(work / "ca"),
            "--cluster",
            "bench",
            "--entries",
            str(work / "entries.yaml"),
            "--node",
            "bench",
            "--socket",
            str(sock),
            "--data-dir",
            str(work / "data"),
            "--admin",
            "off",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wait_socket(sock, process)
    return process, sock


def start_echo(work: Path, front: bool) -> tuple[subprocess.Popen[str], Path]:
    sock = work / ("echo-front.sock" if front else "echo.sock")
    process = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER, str(sock), "front" if front else "direct"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wait_socket(sock, process)
    return process, sock


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "benchmark": "workload_api",
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cpus": os.cpu_count(),
        "calls_each": args.calls,
    }
    with tempfile.TemporaryDirectory(prefix="tr-bench-") as tmp:
        work = Path(tmp)
        processes = []
        try:
            agent, agent_sock = start_agent(work)
            processes.append(agent)
            direct, direct_sock = start_echo(work, front=False)
            processes.append(direct)
            fronted, front_sock = start_echo(work, front=True)
            processes.append(fronted)

            with grpc.insecure_channel(f"unix:{agent_sock}") as channel:
                fetch = channel.unary_stream(
                    method_path("FetchX509SVID"),
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=workload_pb2.X509SVIDResponse.FromString,
                )
                jwt = channel.unary_unary(
                    method_path("FetchJWTSVID"),
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=workload_pb2.JWTSVIDResponse.FromString,
                )
                x509_request = workload_pb2.X509SVIDRequest()
                jwt_request = workload_pb2.JWTSVIDRequest(audience=["bench"])

                def fetch_x509() -> None:
                    stream = fetch(x509_request, metadata=METADATA, timeout=10)
                    response = next(stream)
                    stream.cancel()
                    assert response.svids

                def fetch_jwt() -> None:
                    assert jwt(jwt_request, metadata=METADATA, timeout=10).svids

                fetch_x509()  # waits for the agent's first sync
                results["fetch_x509_svid"] = measure(fetch_x509, args.calls, args.warmup)
                results["fetch_jwt_svid"] = measure(fetch_jwt, args.calls, args.warmup)

            for name, sock in (
                ("baseline_echo_direct", direct_sock),
                ("baseline_echo_via_front", front_sock),
            ):
                with grpc.insecure_channel(f"unix:{sock}") as channel:
                    echo = channel.unary_unary("/Echo/Echo")
                    results[name] = measure(
                        lambda e=echo: e(b"", timeout=10), args.calls, args.warmup
                    )
        finally:
            for process in processes:
                stop(process)
    base = results["baseline_echo_direct"]["p50_ms"]
    results["x509_p50_over_echo_p50"] = round(results["fetch_x509_svid"]["p50_ms"] / base, 2)
    results["front_p50_overhead_ms"] = round(results["baseline_echo_via_front"]["p50_ms"] - base, 3)
    results["target_p99_ms"] = 5.0
    results["target_met"] = (
        max(results["fetch_x509_svid"]["p99_ms"], results["fetch_jwt_svid"]["p99_ms"]) <= 5.0
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
