"""Kernel TLS offload: the Linux kernel seals and opens a TLS 1.3 connection's records.

Theory of operation
-------------------
The engine (`sidecar.tls`) does the handshake in user space. At handshake completion,
with every byte of `data_to_send()` on the wire and the engine's reader at a record
boundary, `attach()` hands the record layer to the kernel (Documentation/networking/
tls.rst): `setsockopt(SOL_TCP, TCP_ULP, "tls")`, then `TLS_TX` and `TLS_RX` with the
keys, IVs and sequence numbers from `Connection.traffic_secrets()`. Records the engine
sealed or opened before the switch (the server's NewSessionTickets, application data
that arrived with the client's Finished) are already counted in those sequence
numbers; application data the engine opened but the caller has not read is handed
to `attach()` as `pending` and returned first by `recv()`.

After the switch plain `send()` writes application data records. Reads go through
`recvmsg` with a control buffer, because the kernel returns a record of any other type
only with a (SOL_TLS, TLS_GET_RECORD_TYPE) cmsg, and fails a plain `recv()` with EIO:

* handshake (22): given to the engine (`receive_decrypted_record`). A NewSessionTicket
  becomes the engine's `SessionTicket` event (stored in the client's ticket store). A
  KeyUpdate (RFC 8446 §4.6.3): Linux before 6.14 cannot take a new key on a kTLS socket,
  so the connection is closed cleanly (close_notify) and `Stats.key_update_closes`
  counted, and the pool dials anew; from 6.14 the kernel pauses RX (reads fail with
  EKEYEXPIRED) until the next read key is set with TLS_RX, and a requested update is
  answered with our KeyUpdate and a new TLS_TX key.
* alert (21): close_notify ends the read side (`recv()` returns b""); any other alert
  is fatal (`KtlsClosed`).

We never initiate a KeyUpdate on a kernel that cannot rekey: the sidecar replaces a
pooled connection long before the AEAD's record limit instead (`can_rekey()`).

API (the sidecar's data paths build on exactly this):

* `probe() -> Probe` — once per process: is the "tls" ULP there? Logged once when not.
* `attach(sock, conn, pending=b"") -> KtlsSocket` — raises `KtlsUnavailable` (with a
  `reason` for `trellis_ktls_fallback_total{reason}`) when the kernel refuses; the
  socket is then unchanged only if the failure came at TCP_ULP (`reason="ulp"`),
  otherwise the connection must be closed.
* `KtlsSocket.send(data)`, `recv(n) -> bytes` (b"" at close_notify/EOF),
  `send_control(record_type, payload)`, `close()` (close_notify, then shutdown),
  `fileno()` for `os.splice` (the direct mode splices plaintext through a pipe into
  and out of this descriptor), `events` (engine events that arrived after the switch).
* `KtlsStream` — the asyncio shell over a non-blocking `KtlsSocket`:
  `await read(n)`, `await write(data)`, `await close()`.
* `Stats` (`STATS`) — counters the sidecar exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.tls.alerts import AlertDescription, AlertLevel, TLSError
from sidecar.tls.connection import Connection, DirectionSecrets
from sidecar.tls.events import ApplicationData, ConnectionClosed, Event, KeyUpdated
from sidecar.tls.messages import KeyUpdate, KeyUpdateRequest, push_key_update
from sidecar.tls.record import MAX_PLAINTEXT, ContentType
from sidecar.tls.suites import CipherSuite

__all__ = [
    "STATS",
    "KtlsClosed",
    "KtlsSocket",
    "KtlsStream",
    "KtlsUnavailable",
    "Probe",
    "Stats",
    "attach",
    "can_rekey",
    "crypto_info",
    "probe",
]

log = logging.getLogger("trellis.ktls")

# include/uapi/linux/tcp.h, include/linux/socket.h, include/uapi/linux/tls.h
TCP_ULP = 31
SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
TLS_SET_RECORD_TYPE = 1  # cmsg type on sendmsg
TLS_GET_RECORD_TYPE = 2  # cmsg type on recvmsg
TLS_1_3_VERSION = 0x0304
TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_CHACHA20_POLY1305 = 54
_CIPHERS = {
    CipherSuite.AES_128_GCM_SHA256: TLS_CIPHER_AES_GCM_128,
    CipherSuite.AES_256_GCM_SHA384: TLS_CIPHER_AES_GCM_256,
    CipherSuite.CHACHA20_POLY1305_SHA256: TLS_CIPHER_CHACHA20_POLY1305,
}
ULP_LIST = "/proc/sys/net/ipv4/tcp_available_ulp"
# Linux 6.14 ("tls: add support for key updates"): TLS 1.3 TX/RX keys may be replaced.
REKEY_KERNEL = (6, 14)
_CMSG_SPACE = socket.CMSG_SPACE(1)


class KtlsUnavailable(Exception):
    """kTLS cannot carry this connection; `reason` labels the fallback metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"kTLS unavailable ({reason}): {detail}")
        self.reason = reason


class KtlsClosed(Exception):
    """The peer ended the connection with a fatal alert or a protocol error."""


@dataclass(slots=True)
class Stats:
    """What the sidecar exports: handovers per direction, fallbacks by reason, and
    connections closed because a KeyUpdate could not be followed (Linux < 6.14)."""

    enabled: dict[str, int] = field(default_factory=lambda: {"tx": 0, "rx": 0})
    fallbacks: dict[str, int] = field(default_factory=dict)
    key_update_closes: int = 0
    rekeys: int = 0

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1


STATS = Stats()


@dataclass(frozen=True, slots=True)
class Probe:
    available: bool
    reason: str  # "" when available; else why not, one line


_probe_lock = threading.Lock()
_probed: Probe | None = None


def _probe_kernel() -> Probe:
    try:
        if "tls" in Path(ULP_LIST).read_text(encoding="ascii").split():
            return Probe(True, "")
    except OSError:
        pass
    # The tls module may be loadable but not loaded: TCP_ULP asks for it by name
    # ("tcp-ulp-tls") before checking the socket's state, so on an unconnected socket
    # ENOTCONN means present and ENOENT absent.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                return Probe(True, "")
            return Probe(False, f"the kernel has no TLS ULP ({os.strerror(exc.errno or 0)})")
    return Probe(True, "")


def probe() -> Probe:
    """Whether this kernel offers kTLS; checked once per process, logged once if not."""
    global _probed
    with _probe_lock:
        if _probed is None:
            _probed = _probe_kernel()
            if not _probed.available:
                log.info("kTLS off, using the user-space record layer: %s", _probed.reason)
        return _probed


def _reset_probe() -> None:
    """For tests: forget the probe's answer."""
    global _probed
    with _probe_lock:
        _probed = None


def kernel_version(release: str | None = None) -> tuple[int, int]:
    release = release if release is not None else os.uname().release
    parts = release.split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return 0, 0


def can_rekey(release: str | None = None) -> bool:
    """Whether the kernel accepts new TLS 1.3 keys on a kTLS socket (Linux >= 6.14)."""
    return kernel_version(release) >= REKEY_KERNEL


def crypto_info(suite: int, direction: DirectionSecrets) -> bytes:
    """The `tls12_crypto_info_*` struct for TLS 1.3 (include/uapi/linux/tls.h).

    GCM: version, cipher_type (host order), iv[8], key, salt[4], rec_seq[8]; the
    12-byte IV of RFC 8446 §5.3 is salt || iv. ChaCha20-Poly1305: iv[12], key[32],
    no salt, rec_seq[8]. rec_seq is big-endian, the record sequence number as in the
    nonce."""
    cipher = next((c for s, c in _CIPHERS.items() if s == suite), None)
    if cipher is None:
        raise KtlsUnavailable("suite", f"no kTLS cipher for suite 0x{suite:04x}")
    seq = direction.seq.to_bytes(8, "big")
    head = struct.pack("=HH", TLS_1_3_VERSION, cipher)
    if cipher == TLS_CIPHER_CHACHA20_POLY1305:
        return head + direction.iv + direction.key + seq
    return head + direction.iv[4:] + direction.key + direction.iv[:4] + seq


def _fill_record(sock: socket.socket, conn: Connection, timeout: float) -> None:
    """Read the rest of a record the engine holds in part, so the kernel starts at a
    record boundary (a kTLS RX socket parses records from the next byte on)."""
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        # Bounded: every recv brings at least one byte of a record of at most
        # 5 + 2^14 + 256 bytes (RFC 8446 §5.2).
        for _ in range(MAX_PLAINTEXT + 512):
            wanted = conn.record_bytes_awaited()
            if not wanted:
                return
            data = sock.recv(wanted)
            if not data:
                raise KtlsUnavailable("eof", "peer closed inside a record")
            conn.receive_data(data)
    except TimeoutError:
        raise KtlsUnavailable("timeout", "the peer stopped inside a record") from None
    finally:
        sock.settimeout(previous)


def attach(
    sock: socket.socket,
    conn: Connection,
    pending: bytes = b"",
    *,
    timeout: float = 10.0,
) -> KtlsSocket:
    """Hand `conn`'s record layer to the kernel. `conn.data_to_send()` must already be
    on the wire; `pending` is application data the engine opened that the caller has
    not consumed. Events the engine raises while the partial record is completed are
    in the returned socket's `events`, and their application data in its pending bytes.
    """
    found = probe()
    if not found.available:
        STATS.fallback("no_kernel_support")
        raise KtlsUnavailable("no_kernel_support", found.reason)
    if conn.data_to_send():
        raise KtlsUnavailable("unsent", "the engine still had bytes to send")
    events: list[Event] = []
    buffered = bytearray(pending)
    if conn.record_bytes_awaited():
        _fill_record(sock, conn, timeout)
        for event in conn.take_events():
            if isinstance(event, ApplicationData):
                buffered += event.data
            else:
                events.append(event)
        if conn.data_to_send():
            raise KtlsUnavailable("unsent", "the engine answered inside the handover")
    secrets = conn.traffic_secrets()
    tx = crypto_info(secrets.cipher_suite, secrets.write)
    rx = crypto_info(secrets.cipher_suite, secrets.read)
    try:
        sock.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        STATS.fallback("ulp")
        raise KtlsUnavailable("ulp", os.strerror(exc.errno or 0)) from None
    try:
        sock.setsockopt(SOL_TLS, TLS_TX, tx)
    except OSError as exc:
        STATS.fallback("tx")
        raise KtlsUnavailable("tx", os.strerror(exc.errno or 0)) from None
    STATS.enabled["tx"] += 1
    try:
        sock.setsockopt(SOL_TLS, TLS_RX, rx)
    except OSError as exc:
        STATS.fallback("rx")
        raise KtlsUnavailable("rx", os.strerror(exc.errno or 0)) from None
    STATS.enabled["rx"] += 1
    ktls = KtlsSocket(sock, conn, bytes(buffered))
    ktls.events.extend(events)
    return ktls


class KtlsSocket:
    """A TCP socket whose TLS 1.3 records the kernel seals and opens.

    Blocking or not as the socket is; non-blocking calls raise BlockingIOError as
    `socket` does."""

    def __init__(self, sock: socket.socket, conn: Connection, pending: bytes = b"") -> None:
        self.sock = sock
        self.conn = conn
        self.events: list[Event] = []
        self._pending = pending
        self.read_closed = False
        self.write_closed = False
        self._rekey = can_rekey()
        # Which record types arrived after the switch, for tests and /config.
        self.control_records: dict[int, int] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    # --- writing -----------------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> int:
        """Application data; the kernel frames it into records of up to 2^14 bytes."""
        if self.write_closed:
            raise BrokenPipeError("kTLS connection closed for writing")
        return self.sock.send(data)

    def sendall(self, data: bytes | memoryview) -> None:
        if self.write_closed:
            raise BrokenPipeError("kTLS connection closed for writing")
        self.sock.sendall(data)

    def send_control(self, record_type: int, payload: bytes) -> None:
        """One record of another type (alert, handshake) through the kernel's TX state:
        sendmsg with a (SOL_TLS, TLS_SET_RECORD_TYPE) cmsg."""
        if len(payload) > MAX_PLAINTEXT:
            raise ValueError("a control record holds at most 2^14 bytes")
        cmsg = [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes((record_type,)))]
        sent = self.sock.sendmsg([payload], cmsg)
        if sent != len(payload):  # a control record is all or nothing in the kernel
            raise OSError(errno.EIO, "short control record")

    def send_alert(self, description: AlertDescription, fatal: bool = False) -> None:
        level = AlertLevel.fatal if fatal else AlertLevel.warning
        self.send_control(ContentType.alert, bytes((level, description)))

    def close(self) -> None:
        """close_notify (RFC 8446 §6.1), then shut our write side down."""
        if self.write_closed:
            return
        self.write_closed = True
        previous = self.sock.gettimeout()
        try:
            self.sock.settimeout(5.0)  # an alert is 24 bytes: the buffer always has room
            self.send_alert(AlertDescription.close_notify)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone; nothing left to tell it
        finally:
            self.sock.settimeout(previous)

    # --- reading -----------------------------------------------------------------------

    def recv(self, size: int = 65536) -> bytes:
        """Application data, b"" once the peer sent close_notify (or EOF, or we closed
        after a KeyUpdate the kernel cannot follow). Control records are handled here."""
        if self._pending:
            data, self._pending = self._pending[:size], self._pending[size:]
            return data
        for _ in range(64):  # bounded: a burst of control records, then data or an error
            if self.read_closed:
                return b""
            try:
                # Room for a whole record: a control record must come in one piece.
                data, ancdata, _flags, _ = self.sock.recvmsg(max(size, MAX_PLAINTEXT), _CMSG_SPACE)
            except OSError as exc:
                if exc.errno == errno.EKEYEXPIRED:
                    # Linux >= 6.14: RX waits for the key after the peer's KeyUpdate,
                    # which the handshake record before this read already installed.
                    raise KtlsClosed("kTLS read key expired without an update") from None
                if exc.errno in (errno.EBADMSG, errno.EMSGSIZE, errno.EINVAL):
                    # The kernel failed a record's authentication (EBADMSG), length
                    # (EMSGSIZE) or header (EINVAL) and stopped reading; it sends no
                    # alert itself (RFC 8446 §5.2: bad_record_mac / record_overflow).
                    self._fatal(
                        AlertDescription.bad_record_mac
                        if exc.errno == errno.EBADMSG
                        else AlertDescription.record_overflow
                        if exc.errno == errno.EMSGSIZE
                        else AlertDescription.decode_error
                    )
                    raise KtlsClosed(f"bad record: {os.strerror(exc.errno)}") from None
                raise
            record_type: int = ContentType.application_data
            for level, kind, value in ancdata:
                if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE and value:
                    record_type = value[0]
            if record_type == ContentType.application_data:
                if not data:
                    self.read_closed = True  # TCP EOF without close_notify
                if len(data) > size:
                    data, self._pending = data[:size], data[size:]
                return data
            self.control_records[record_type] = self.control_records.get(record_type, 0) + 1
            self._control(record_type, data)
        raise KtlsClosed("too many control records without application data")

    def _control(self, record_type: int, fragment: bytes) -> None:
        conn = self.conn
        try:
            conn.receive_decrypted_record(record_type, fragment)
        except TLSError as exc:
            conn.data_to_send()  # sealed under the engine's stale write state
            self._fatal(exc.alert)
            raise KtlsClosed(f"peer's record refused: {exc}") from None
        conn.data_to_send()  # anything the engine queued is ours to send, below
        for event in conn.take_events():
            if isinstance(event, KeyUpdated) and event.direction == "read":
                self._key_update(event.requested)
            elif isinstance(event, ConnectionClosed):
                self.read_closed = True
                if not event.clean:
                    self.write_closed = True
                    raise KtlsClosed("peer sent a fatal alert")
            elif isinstance(event, KeyUpdated):
                continue  # our own answering update, already handled
            else:
                self.events.append(event)

    def _key_update(self, requested: bool) -> None:
        if not self._rekey:
            # Linux < 6.14 cannot take the peer's next read key: end cleanly and let
            # the pool dial a new connection (issue: replace before the record limit).
            STATS.key_update_closes += 1
            self.read_closed = True
            self.close()
            return
        secrets = self.conn.traffic_secrets()
        suite = secrets.cipher_suite
        self.sock.setsockopt(SOL_TLS, TLS_RX, crypto_info(suite, secrets.read))
        if requested and not self.write_closed:
            # RFC 8446 §4.6.3: answer under the old key, then switch ours.
            self.send_control(
                ContentType.handshake,
                push_key_update(KeyUpdate(KeyUpdateRequest.update_not_requested)),
            )
            self.sock.setsockopt(SOL_TLS, TLS_TX, crypto_info(suite, secrets.write))
        STATS.rekeys += 1

    def _fatal(self, alert: AlertDescription) -> None:
        self.read_closed = True
        if not self.write_closed:
            self.write_closed = True
            with contextlib.suppress(OSError):
                self.send_alert(alert, fatal=True)


class KtlsStream:
    """asyncio shell over a kTLS socket: non-blocking reads and writes after the switch.

    `loop.sock_recv` would call recv(), which the kernel fails with EIO on a control
    record; reads here use recvmsg through `KtlsSocket.recv` when the socket is
    readable."""

    def __init__(self, ktls: KtlsSocket) -> None:
        self.ktls = ktls
        ktls.sock.setblocking(False)
        self._loop = asyncio.get_running_loop()

    async def _wait(self, add: Callable[..., None], remove: Callable[[int], object]) -> None:
        fd = self.ktls.fileno()
        ready: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        add(fd, wake)
        try:
            await ready
        finally:
            remove(fd)

    async def read(self, size: int = 65536) -> bytes:
        while True:
            try:
                return self.ktls.recv(size)
            except (BlockingIOError, InterruptedError):
                # Readable TCP data can still be half a record: wait for more.
                await self._wait(self._loop.add_reader, self._loop.remove_reader)

    async def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.ktls.send(view)
            except (BlockingIOError, InterruptedError):
                await self._wait(self._loop.add_writer, self._loop.remove_writer)
                continue
            view = view[sent:]

    async def close(self) -> None:
        ktls = self.ktls
        if ktls.write_closed:
            return
        ktls.sock.setblocking(True)
        try:
            await asyncio.to_thread(ktls.close)
        finally:
            ktls.sock.setblocking(False)
