"""Peers for the kTLS tests inside the guest: real loopback TCP sockets, the engine's
handshake over them, then the kernel, the engine's own record layer, or OpenSSL 4.0
(pyOpenSSL) on the other end."""

from __future__ import annotations

import hashlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from OpenSSL import SSL

from sidecar import ktls
from sidecar.tls import ClientConnection, Connection, ServerConnection
from sidecar.tls.events import ApplicationData, ConnectionClosed, Event, SessionTicket
from sidecar.tls.suites import CipherSuite
from sidecar.tls.tickets import StekRing
from tests.sidecar.tls.resumption_support import stek
from tests.sidecar.tls.test_interop_system_fixtures import Svid, client_svid, server_svid

TIMEOUT = 30.0
SUITES = (
    CipherSuite.AES_128_GCM_SHA256,
    CipherSuite.AES_256_GCM_SHA384,
    CipherSuite.CHACHA20_POLY1305_SHA256,
)
CHUNK = 1 << 16


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (client end, server end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=TIMEOUT)
        server, _ = listener.accept()
    server.settimeout(TIMEOUT)
    return client, server


def ring() -> StekRing:
    made = StekRing()
    made.install(stek(0, start=time.time() - 60), (), None)
    return made


def client_engine(suite: int) -> ClientConnection:
    config = client_svid().config(cipher_suites=(suite,), alpn_protocols=("h2",))
    return ClientConnection(config, server_name="localhost", now=time.time())


def server_engine(suite: int) -> ServerConnection:
    config = server_svid().config(
        cipher_suites=(suite,), alpn_protocols=("h2",), ticket_ring=ring()
    )
    return ServerConnection(config, now=time.time())


@dataclass
class Handshaken:
    conn: Connection
    sock: socket.socket
    pending: bytes = b""
    events: list[Event] = field(default_factory=list)

    def take(self) -> None:
        for event in self.conn.take_events():
            if isinstance(event, ApplicationData):
                self.pending += event.data
            else:
                self.events.append(event)


def handshake_pair(suite: int) -> tuple[Handshaken, Handshaken]:
    """The engine on both ends of a real TCP connection, pumped until both completed
    and the server's NewSessionTickets are on the wire (the client has not read them:
    they arrive after its switch)."""
    csock, ssock = tcp_pair()
    client = Handshaken(client_engine(suite), csock)
    server = Handshaken(server_engine(suite), ssock)
    by_fd = {csock.fileno(): client, ssock.fileno(): server}
    for _ in range(100):
        for side in (client, server):
            out = side.conn.data_to_send()
            if out:
                side.sock.sendall(out)
        if client.conn.handshake_complete and server.conn.handshake_complete:
            client.take()
            server.take()
            return client, server
        ready, _, _ = select.select([csock, ssock], [], [], TIMEOUT)
        assert ready, "handshake stalled"
        for sock in ready:
            side = by_fd[sock.fileno()]
            side.conn.receive_data(sock.recv(CHUNK), now=time.time())
    raise AssertionError("handshake did not complete")


def handshake_one(conn: Connection, sock: socket.socket) -> Handshaken:
    """The engine's side of a handshake against a peer running in another thread."""
    side = Handshaken(conn, sock)
    for _ in range(100):
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
        if conn.handshake_complete:
            side.take()
            return side
        data = sock.recv(CHUNK)
        assert data, "peer closed during the handshake"
        conn.receive_data(data, now=time.time())
    raise AssertionError("handshake did not complete")


def to_kernel(side: Handshaken) -> ktls.KtlsSocket:
    out = side.conn.data_to_send()
    if out:
        side.sock.sendall(out)
    return ktls.attach(side.sock, side.conn, side.pending)


def payload(size: int) -> bytes:
    """Incompressible, size-exact test data (a repeating block keeps it cheap)."""
    block = os.urandom(min(size, 1 << 20) or 1)
    return (block * (size // len(block) + 1))[:size]


def read_exactly(recv: Callable[[int], bytes], size: int) -> bytes:
    parts = []
    got = 0
    while got < size:
        data = recv(min(CHUNK, size - got))
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def digest_exactly(recv: Callable[[int], bytes], size: int) -> tuple[int, str]:
    """(bytes read, sha256) of the next `size` bytes, without keeping them."""
    hasher = hashlib.sha256()
    got = 0
    while got < size:
        data = recv(min(16 * CHUNK, size - got))  # big reads: fewer trips through Python
        if not data:
            break
        hasher.update(data)
        got += len(data)
    return got, hasher.hexdigest()


class Background(threading.Thread):
    """A peer's loop in a thread; its exception, if any, is raised by `result()`."""

    def __init__(self, target: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None
        self.value: object = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self._target_fn()
        except BaseException as exc:  # handed to the test thread by result()
            self.error = exc

    def result(self) -> object:
        self.join(TIMEOUT * 4)
        assert not self.is_alive(), "peer thread did not finish"
        if self.error is not None:
            raise self.error
        return self.value


class EngineRecv:
    """`recv(n)` over the engine's user-space record layer on a socket."""

    def __init__(self, side: Handshaken) -> None:
        self.side = side
        self.buffer = bytearray(side.pending)
        self.closed: ConnectionClosed | None = None
        self.tickets: list[SessionTicket] = [e for e in side.events if isinstance(e, SessionTicket)]

    def __call__(self, size: int) -> bytes:
        for _ in range(1 << 20):
            if self.buffer or self.closed is not None:
                break
            data = self.side.sock.recv(CHUNK)
            self.side.conn.receive_data(data)
            out = self.side.conn.data_to_send()
            if out:
                self.side.sock.sendall(out)
            for event in self.side.conn.take_events():
                if isinstance(event, ApplicationData):
                    self.buffer += event.data
                elif isinstance(event, ConnectionClosed):
                    self.closed = event
                elif isinstance(event, SessionTicket):
                    self.tickets.append(event)
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            self.side.conn.send_application_data(view[start : start + CHUNK])
            self.side.sock.sendall(self.side.conn.data_to_send())


def blocking_with_timeouts(sock: socket.socket) -> socket.socket:
    """pyOpenSSL needs a blocking socket; the kernel's own timeouts bound a stuck peer."""
    sock.settimeout(None)
    timeval = struct.pack("ll", int(TIMEOUT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    return sock


def openssl_context(ident: Svid, server: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_chain_file(ident.cert)
    ctx.use_privatekey_file(ident.key_file)
    ctx.load_verify_locations(ident.bundle)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: args[-1])
    return ctx


def openssl_echo(sock: socket.socket, server: bool) -> int:
    """OpenSSL 4.0 echoes until close_notify, answers it, and returns the bytes echoed."""
    ident = server_svid() if server else client_svid()
    conn = SSL.Connection(openssl_context(ident, server), blocking_with_timeouts(sock))
    if server:
        conn.set_accept_state()
    else:
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
    conn.do_handshake()
    echoed = 0
    for _ in range(1 << 20):
        try:
            data = conn.recv(CHUNK)
        except SSL.ZeroReturnError:
            break
        if not data:
            break
        conn.sendall(data)
        echoed += len(data)
    conn.shutdown()
    return echoed
