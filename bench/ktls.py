"""CPU per GB relayed: the user-space record layer, kTLS, and kTLS with splice.

    python3 bench/ktls.py [--mb 64] [--rounds 1] [--suite AES_128_GCM_SHA256] [--here]

A sidecar's data path in miniature, on loopback inside one process: a source writes N
MB into an app socket; the *sending relay* moves them onto a TLS connection, the
*receiving relay* takes them off it into a second app socket, and a sink reads and
checks them (CRC-32 and length against the source's). The engine handshakes the TLS
connection first (P-256 SVIDs from the project's CA), then each path relays:

* ``user-space``: recv, the engine seals (or opens) the records, send -- the sidecar
  without kTLS;
* ``ktls``: recv, send on a kTLS socket (`sidecar.ktls`): the kernel seals and opens,
  the plaintext still crosses user space -- the pooled mode's record layer;
* ``ktls+splice``: `splice(2)` through a pipe between the app socket and the kTLS
  socket (`sidecar.offload`): the payload never enters user space -- the direct mode.

Only the two relays' threads are measured (`time.thread_time`: user and system time of
that thread, kernel encryption on send and decryption on receive included); the source
and the sink are the apps. The kernel these machines run has no kTLS, so without
``--here`` the script boots the QEMU guest (`tests/kernel/guest_vm.py`, Linux 6.1) and
runs itself there. The guest's CPU is emulated: the figures are relative (the ratio of
each path to ``user-space``), never absolute speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import select
import socket
import statistics
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric import ec

from ca import KeyAlgorithm, RootAuthority, TrustDomain
from sidecar import ktls
from sidecar.offload import splice_to_app, splice_to_peer
from sidecar.tls import (
    ApplicationData,
    CipherSuite,
    ClientConnection,
    Connection,
    ConnectionClosed,
    ServerConnection,
    TLSConfig,
)

TD = "example.org"
CHUNK = 1 << 16
TIMEOUT = 600.0  # per path; an emulated CPU is slow, but never stuck this long
PATHS = ("user-space", "ktls", "ktls+splice")


def _configs(suite: CipherSuite) -> tuple[TLSConfig, TLSConfig]:
    now = dt.datetime.now(dt.UTC)
    root = RootAuthority.create(TrustDomain(TD), now=now, key_algorithm=KeyAlgorithm.P256)
    inter = root.issue_intermediate("bench", now=now)
    configs = []
    for sa in ("client", "server"):
        key = ec.generate_private_key(ec.SECP256R1())
        svid = inter.issue_x509_svid(f"spiffe://{TD}/ns/default/sa/{sa}", key.public_key(), now=now)
        configs.append(
            TLSConfig(
                rng=os.urandom,
                certificate_chain=list(svid.chain),
                private_key=key,
                trust_bundles={TD: [root.certificate]},
                alpn_protocols=("h2",),
                cipher_suites=(suite,),
                require_client_certificate=sa == "server",
            )
        )
    return configs[0], configs[1]


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        one = socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT)
        two, _ = listener.accept()
    two.settimeout(TIMEOUT)
    return one, two


def _handshake(
    client: Connection, server: Connection, csock: socket.socket, ssock: socket.socket
) -> None:
    """Both engines over the real TCP connection, until both are done and every
    handshake byte is on the wire (bounded: a handshake is a few flights)."""
    sides = {csock.fileno(): (client, csock), ssock.fileno(): (server, ssock)}
    for _ in range(100):
        for conn, sock in sides.values():
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
        if client.handshake_complete and server.handshake_complete:
            for conn, _sock in sides.values():
                conn.take_events()
            return
        ready, _, _ = select.select([csock, ssock], [], [], TIMEOUT)
        if not ready:
            raise TimeoutError("handshake stalled")
        for sock in ready:
            conn, _ = sides[sock.fileno()]
            conn.receive_data(sock.recv(CHUNK), now=time.time())
    raise RuntimeError("handshake did not complete")


# --- relays: each returns its thread's CPU seconds -----------------------------------------


def _user_space_out(app: socket.socket, conn: Connection, tls: socket.socket) -> None:
    while data := app.recv(CHUNK):
        conn.send_application_data(data)
        tls.sendall(conn.data_to_send())
    conn.close()
    tls.sendall(conn.data_to_send())
    tls.shutdown(socket.SHUT_WR)


def _user_space_in(tls: socket.socket, conn: Connection, app: socket.socket) -> None:
    while True:
        data = tls.recv(CHUNK)
        conn.receive_data(data)
        for event in conn.take_events():
            if isinstance(event, ApplicationData):
                app.sendall(event.data)
            elif isinstance(event, ConnectionClosed):
                data = b""
        if not data:
            app.shutdown(socket.SHUT_WR)
            return


def _ktls_out(app: socket.socket, sink: ktls.KtlsSocket) -> None:
    while data := app.recv(CHUNK):
        sink.sendall(data)
    sink.close()


def _ktls_in(source: ktls.KtlsSocket, app: socket.socket) -> None:
    while data := source.recv(CHUNK):
        app.sendall(data)
    app.shutdown(socket.SHUT_WR)


class _Timed(threading.Thread):
    """Runs `work` and keeps the thread's CPU seconds, or its exception."""

    def __init__(self, work: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.work = work
        self.cpu = 0.0
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        start = time.thread_time()
        try:
            self.work()
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        self.cpu = time.thread_time() - start

    def result(self) -> float:
        self.join(TIMEOUT)
        if self.is_alive():
            raise TimeoutError("a relay did not finish")
        if self.error is not None:
            raise self.error
        return self.cpu


def measure(path: str, size: int, suite: CipherSuite) -> dict[str, object]:
    client_cfg, server_cfg = _configs(suite)
    client = ClientConnection(client_cfg, server_name=None, now=time.time())
    server = ServerConnection(server_cfg, now=time.time())
    tls_out, tls_in = _tcp_pair()
    _handshake(client, server, tls_out, tls_in)
    src, app_out = _tcp_pair()  # the calling app -> the sending relay
    app_in, sink = _tcp_pair()  # the receiving relay -> the called app
    block = os.urandom(1 << 20)
    expected = 0
    for offset in range(0, size, len(block)):
        expected = zlib.crc32(block[: size - offset], expected)

    for sock in (tls_out, tls_in, app_out, app_in):
        # Blocking, no timeout: a socket with a timeout is non-blocking underneath, and
        # splice(2) on it would fail with EAGAIN instead of waiting.
        sock.setblocking(True)
    if path == "user-space":
        relays = (
            lambda: _user_space_out(app_out, client, tls_out),
            lambda: _user_space_in(tls_in, server, app_in),
        )
    else:
        k_out, k_in = ktls.attach(tls_out, client), ktls.attach(tls_in, server)
        if path == "ktls":
            relays = (lambda: _ktls_out(app_out, k_out), lambda: _ktls_in(k_in, app_in))
        else:
            relays = (lambda: splice_to_peer(app_out, k_out), lambda: splice_to_app(k_in, app_in))

    def source() -> None:
        for offset in range(0, size, len(block)):
            src.sendall(block[: size - offset])
        src.shutdown(socket.SHUT_WR)

    received = [0, 0]  # bytes, crc

    def drain() -> None:
        while data := sink.recv(CHUNK):
            received[0] += len(data)
            received[1] = zlib.crc32(data, received[1])

    started = time.monotonic()
    workers = [_Timed(source), _Timed(drain)]
    timed = [_Timed(relay) for relay in relays]
    cpu = sum(t.result() for t in timed)
    for worker in workers:
        worker.result()
    elapsed = time.monotonic() - started
    for sock in (tls_out, tls_in, src, app_out, app_in, sink):
        sock.close()
    if received != [size, expected]:
        raise RuntimeError(
            f"{path}: {received[0]} of {size} bytes, CRC match {received[1] == expected}"
        )
    return {
        "cpu_seconds": round(cpu, 3),
        "cpu_seconds_per_gb": round(cpu * (1 << 30) / size, 2),
        "wall_seconds": round(elapsed, 2),
    }


def aead_floor(size: int, suite: CipherSuite) -> float:
    """CPU seconds to seal and open `size` bytes as 16 KiB records with the suite's AEAD
    (OpenSSL through `cryptography`): work every path does somewhere, in user space or
    in the kernel, so what lies above it is each path's own overhead."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    key_size = 32 if suite != CipherSuite.AES_128_GCM_SHA256 else 16
    aead = (ChaCha20Poly1305 if suite == CipherSuite.CHACHA20_POLY1305_SHA256 else AESGCM)(
        os.urandom(key_size)
    )
    record = os.urandom(1 << 14)
    header = b"\x17\x03\x03\x40\x11"
    start = time.thread_time()
    for seq in range(size >> 14):
        nonce = seq.to_bytes(12, "big")
        aead.decrypt(nonce, aead.encrypt(nonce, record, header), header)
    return time.thread_time() - start


def _median(runs: list[dict[str, object]]) -> dict[str, object]:
    ordered = sorted(runs, key=lambda r: float(r["cpu_seconds_per_gb"]))  # type: ignore[arg-type]
    median = dict(ordered[len(ordered) // 2])
    median["rounds_cpu_seconds_per_gb"] = [r["cpu_seconds_per_gb"] for r in runs]
    return median


# QEMU counting instructions (`-icount shift=0`: one nanosecond of guest time per guest
# instruction, which needs single-threaded TCG): the guest's clocks, and so the CPU time
# its threads are charged, then follow the work the guest did and not how often the
# host, shared with other jobs, descheduled the emulator -- wall-clock TCG made the same
# path's figure vary by more than 2x between rounds. It also charges an AES instruction
# like any other, as silicon roughly does, where TCG's wall time charges the host's
# emulation of it.
_ICOUNT_QEMU = """#!{python}
import os, sys
args = ["tcg,thread=single" if a == "tcg,thread=multi" else a for a in sys.argv[1:]]
os.execvp("{qemu}", ["{qemu}", "-icount", "shift=0,sleep=off", *args])
"""


def in_guest(argv: list[str]) -> int:
    """Run this script inside the kTLS guest, instruction-counted, and pass its JSON on."""
    import tempfile

    from tests.kernel import guest_vm

    script = Path(__file__).resolve().relative_to(Path(__file__).resolve().parent.parent)
    line = " ".join([".venv/bin/python", str(script), "--here", *argv])
    with tempfile.TemporaryDirectory(prefix="trellis-bench-ktls-") as folder:
        wrapper = Path(folder) / "qemu-icount"
        wrapper.write_text(_ICOUNT_QEMU.format(python=sys.executable, qemu=guest_vm.QEMU))
        wrapper.chmod(0o755)
        guest_vm.QEMU = str(wrapper)
        try:
            result = guest_vm.run(line, timeout=3000)
        except guest_vm.KernelUnavailable as exc:
            print(f"bench/ktls: {exc}", file=sys.stderr)
            return 1
    print(result.output, end="")
    return result.status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mb", type=int, default=64, help="megabytes per path and round (default 64)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds, median kept (default 1)"
    )
    parser.add_argument(
        "--suite", default="AES_128_GCM_SHA256", choices=[s.name for s in CipherSuite]
    )
    parser.add_argument("--here", action="store_true", help="run on this kernel, not in the guest")
    args = parser.parse_args()
    if not 1 <= args.mb <= 1024:
        parser.error("--mb must be 1..1024")
    if not 1 <= args.rounds <= 9:
        parser.error("--rounds must be 1..9")
    if not args.here:
        return in_guest(sys.argv[1:])
    probe = ktls.probe()
    if not probe.available:
        print(
            f"bench/ktls: this kernel has no kTLS ({probe.reason}); run without --here",
            file=sys.stderr,
        )
        return 1
    size = args.mb << 20
    suite = CipherSuite[args.suite]
    # Rounds interleaved, each starting with another path, and the median taken: the
    # host's other load slows the emulated CPU unevenly, and one busy moment must not
    # decide a ratio.
    rounds: dict[str, list[dict[str, object]]] = {path: [] for path in PATHS}
    floors = []
    for index in range(args.rounds):
        for path in PATHS[index % 3 :] + PATHS[: index % 3]:
            rounds[path].append(measure(path, size, suite))
        floors.append(aead_floor(size, suite) * (1 << 30) / size)
    paths = {path: _median(runs) for path, runs in rounds.items()}
    floor = statistics.median(floors)
    base = float(paths["user-space"]["cpu_seconds_per_gb"])  # type: ignore[arg-type]
    for figures in paths.values():
        per_gb = float(figures["cpu_seconds_per_gb"])  # type: ignore[arg-type]
        figures["relative_to_user_space"] = round(per_gb / base, 3)
        # What the path costs beyond sealing and opening the records themselves.
        figures["beyond_aead_relative_to_user_space"] = round(
            max(per_gb - floor, 0.0) / max(base - floor, 1e-9), 3
        )
    ratio = float(paths["ktls+splice"]["relative_to_user_space"])  # type: ignore[arg-type]
    print(
        json.dumps(
            {
                "bench": "ktls",
                "cpu": "emulated (QEMU TCG, -icount shift=0: guest time counts instructions): "
                "relative figures only, never absolute speed",
                "kernel": os.uname().release,
                "suite": suite.name,
                "megabytes_per_path_and_round": args.mb,
                "rounds": args.rounds,
                "measured": "CPU seconds of the two relay threads per GB relayed",
                "paths": paths,
                "aead_only_cpu_seconds_per_gb": round(floor, 2),
                "target": "ktls+splice at most 1/3 of user-space",
                "target_met": ratio <= 1 / 3,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
