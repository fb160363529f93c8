"""The sidecar data path alone: raw TCP through two `trellis sidecar` processes vs direct.

    python3 bench/sidecar_path.py [--seconds 4] [--rate 1000] [--connections 8]
                                  [--bulk-mib 256] [--profile DIR]

No HTTP, no CA: SVIDs from files, a TCP echo app and a TCP sink app (the data-plane tests'
`echo_app.py`), so what is measured is the sidecars' own cost. Each figure has its baseline
from the same run, the same client against the app directly:

* `pingpong`: one 1 KiB message out and back on each of `--connections` persistent
  connections (one TLS connection carries them all), paced to
  `--rate` messages/s in total: p50/p99 round-trip, and CPU seconds per 1,000 messages of
  each sidecar (utime+stime from /proc, the app's own as the floor). `relay_floor`: the
  same schedule through two bare uvloop relays (`bench/relay.py`: the same reads, writes
  and wake-ups per message, no TLS, HTTP/2, policy or metrics), i.e. what any Python
  proxy pays here before doing anything.
* `bulk`: one connection writing `--bulk-mib` MiB to the sink: MB/s.
* `pooling`: TLS handshakes per app connection after 200 short connections.

`--profile DIR` runs the client-side sidecar under cProfile (figures then mean little).
Prints one JSON document; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.sidecar.dataplane.harness import (  # noqa: E402
    ECHO,
    Pki,
    Procs,
    Sidecar,
    free_port,
    start_echo,
    start_sidecar,
    wait_for,
)

TICKS = os.sysconf("SC_CLK_TCK")
CLIENT_ID = "spiffe://example.org/ns/bench/sa/client"
SERVER_ID = "spiffe://example.org/ns/bench/sa/server"


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def pingpong(port: int, rate: float, seconds: float, conns: int = 8) -> dict[str, Any]:
    latencies: list[float] = []
    interval = conns / rate

    async def one(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        message = os.urandom(1024)
        # Staggered, so the connections' messages interleave instead of arriving in bursts.
        start = time.perf_counter() + index * interval / conns
        sent = 0
        while time.perf_counter() - start < seconds:
            due = start + sent * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(message)
            await reader.readexactly(1024)
            # Latency from the intended send time: a stall delays the next sends too.
            latencies.append(time.perf_counter() - max(due, start))
            sent += 1
        writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(conns)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    n = len(latencies)
    return {
        "messages": n,
        "achieved_per_s": round(n / elapsed, 1),
        "p50_ms": round(latencies[n // 2] * 1e3, 3),
        "p99_ms": round(latencies[int(n * 0.99)] * 1e3, 3),
    }


def bulk(port: int, mib: int) -> float:
    chunk = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        start = time.perf_counter()
        for _ in range(mib):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while data := sock.recv(100):
            reply += data
        elapsed = time.perf_counter() - start
    if int(reply) != mib << 20:
        raise RuntimeError(f"sink counted {reply!r}, sent {mib << 20}")
    return round((mib << 20) / elapsed / 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tr-bench-"))
    procs = Procs(work)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}
    }
    try:
        pki = Pki("example.org")
        echo = start_echo(procs)
        sink = free_port()
        procs.start("sink", [sys.executable, str(ECHO), str(sink), "127.0.0.1", "sink"])
        wait_for(lambda: _listening(sink), 15, "sink")
        server = start_sidecar(
            procs,
            "sidecar-server",
            {
                "svid_dir": str(pki.write(work / "server", SERVER_ID)),
                "inbound": {
                    "targets": {1: {"app": f"127.0.0.1:{echo}"}, 2: {"app": f"127.0.0.1:{sink}"}}
                },
            },
        )
        ports = {"echo": free_port(), "sink": free_port()}
        client_config = {
            "svid_dir": str(pki.write(work / "client", CLIENT_ID)),
            "admin": f"127.0.0.1:{free_port()}",
            "inbound": {"listen": f"127.0.0.1:{free_port()}"},
            "upstreams": [
                {
                    "name": name,
                    "listen": f"127.0.0.1:{port}",
                    "target": f"bench:{index}",
                    "endpoints": [f"127.0.0.1:{server.inbound_port}"],
                    "spiffe_ids": [SERVER_ID],
                }
                for index, (name, port) in enumerate(ports.items(), 1)
            ],
        }
        if args.profile:
            import yaml

            args.profile.mkdir(parents=True, exist_ok=True)
            path = work / "client.yaml"
            path.write_text(yaml.safe_dump(client_config))
            proc = procs.start(
                "sidecar-client",
                [sys.executable, "-m", "cProfile", "-o", str(args.profile / "client.prof"),
                 "-m", "trellis", "sidecar", "--config", str(path)],
            )  # fmt: skip
            client = Sidecar(proc, int(client_config["admin"].rpartition(":")[2]), 0, client_config)
            client.wait_ready()
        else:
            client = start_sidecar(procs, "sidecar-client", client_config)
        pids = {
            "sidecar_client": client.proc.popen.pid,
            "sidecar_server": server.proc.popen.pid,
            "echo_app": procs.running[0].popen.pid,
        }
        asyncio.run(pingpong(ports["echo"], 100, 0.5))  # warm: the pool's first handshake
        bulk(ports["sink"], 1)

        direct = asyncio.run(pingpong(echo, args.rate, args.seconds, args.connections))
        relay_ports = [free_port(), free_port()]
        relays = [
            procs.start(
                f"relay-{i}",
                [sys.executable, str(REPO / "bench" / "relay.py"), str(port), str(target)],
            )
            for i, (port, target) in enumerate(
                zip(relay_ports, [relay_ports[1], echo], strict=True)
            )
        ]
        for port in relay_ports:
            wait_for(lambda port=port: _listening(port), 15, "relay")  # type: ignore[misc]
        asyncio.run(pingpong(relay_ports[0], 100, 0.5))
        before = {f"relay_{i}": cpu_seconds(r.popen.pid) for i, r in enumerate(relays)}
        relayed = asyncio.run(pingpong(relay_ports[0], args.rate, args.seconds, args.connections))
        relay_cpu = {
            name: round((cpu_seconds(r.popen.pid) - before[name]) / relayed["messages"] * 1000, 4)
            for name, r in zip(before, relays, strict=True)
        }
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        mesh = asyncio.run(pingpong(ports["echo"], args.rate, args.seconds, args.connections))
        spent = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
        result["pingpong"] = {
            "offered_per_s": args.rate,
            "direct": direct,
            "mesh": mesh,
            "added_p50_ms": round(mesh["p50_ms"] - direct["p50_ms"], 3),
            "added_p99_ms": round(mesh["p99_ms"] - direct["p99_ms"], 3),
            "cpu_s_per_1000_messages": {
                k: round(v / mesh["messages"] * 1000, 4) for k, v in spent.items()
            },
            "relay_floor": {
                **relayed,
                "added_p50_ms": round(relayed["p50_ms"] - direct["p50_ms"], 3),
                "added_p99_ms": round(relayed["p99_ms"] - direct["p99_ms"], 3),
                "cpu_s_per_1000_messages": relay_cpu,
            },
        }
        direct_bulk = bulk(sink, args.bulk_mib)
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        mesh_bulk = bulk(ports["sink"], args.bulk_mib)
        spent = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
        result["bulk"] = {
            "mib": args.bulk_mib,
            "direct_MB_s": direct_bulk,
            "mesh_MB_s": mesh_bulk,
            "cpu_s_per_GB": {
                k: round(v / (args.bulk_mib << 20) * 1e9, 3)
                for k, v in spent.items()
                if k.startswith("sidecar")
            },
        }
        handshakes_before = client.metric(
            'trellis_sidecar_tls_handshakes_total{direction="outbound"}'
        )
        apps_before = client.metric('trellis_sidecar_app_connections_total{direction="outbound"}')
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", ports["echo"])) as sock:
                sock.sendall(b"x")
                sock.recv(1)
        metrics = client.metrics()
        handshakes = metrics['trellis_sidecar_tls_handshakes_total{direction="outbound"}']
        apps = metrics['trellis_sidecar_app_connections_total{direction="outbound"}']
        result["pooling"] = {
            "app_connections": apps - apps_before,
            "tls_handshakes": handshakes - handshakes_before,
            "handshakes_total_per_app_connection": round(handshakes / apps, 4),
        }
    finally:
        procs.stop_all()
    print(json.dumps(result, indent=2))


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
