"""0.5-RTT data (RFC 8446 §2.3, §4.4.4): a server's application data after its Finished,
before the client's.

The engine sends it only in a resumption, where the ticket's PSK already authenticated
the client; in a full mTLS handshake the client's Certificate and Finished must come
first. The pairs here run in memory, one flight at a time, so each test can stop the
client's Finished on its way and look at both sides at that moment; the interop test
with OpenSSL as the client is at the end.
"""

from __future__ import annotations

import contextlib

import pytest
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from sidecar.tls import (
    ApplicationData,
    ClientConnection,
    HandshakeComplete,
    LocalProtocolError,
    ServerConnection,
)

from .helpers import drain
from .pki import SERVER_ID, client_config, server_config
from .resumption_support import ENDPOINT, T0, Mesh, connect
from .test_interop_pyopenssl import REAL_NOW, _bio_read
from .test_resumption_interop_pyopenssl import (
    EARLY,
    _openssl_client,
    _openssl_session_from,
    _server_config,
)

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"


def _with_ticket() -> Mesh:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    return mesh


def _resuming(mesh: Mesh, early: bytes = REQUEST) -> ClientConnection:
    return ClientConnection(
        mesh.client(),
        "x.example.org",
        T0 + 2,
        endpoint=ENDPOINT,
        expected_peer=SERVER_ID,
        early_data=early,
        replay_safe=bool(early),
    )


def _server_flight(mesh: Mesh, early: bytes = REQUEST) -> tuple[ClientConnection, ServerConnection]:
    """A resuming client's first flight has reached the server, which has sent its own
    flight (still in `data_to_send`); the client's Finished has not been made yet."""
    client = _resuming(mesh, early)
    server = ServerConnection(mesh.server(), now=T0 + 2)
    server.receive_data(client.data_to_send())
    assert not server.handshake_complete
    return client, server


def test_server_answers_accepted_early_data_before_the_clients_finished() -> None:
    client, server = _server_flight(_with_ticket())
    assert [e for e in drain(server) if isinstance(e, ApplicationData)] == [
        ApplicationData(REQUEST, early=True)
    ]
    assert server.can_send_application_data
    server.send_application_data(ANSWER)
    # One read of the server's flight: the client finishes and reads the answer in the
    # same call, before its Finished has left (RFC 8446 §2.3, Figure 4's 0.5-RTT data).
    client.receive_data(server.data_to_send())
    events = drain(client)
    done = next(e for e in events if isinstance(e, HandshakeComplete))
    assert done.session_resumed and done.early_data == "accepted"
    assert ApplicationData(ANSWER) in events
    assert events.index(done) < events.index(ApplicationData(ANSWER))
    assert not server.handshake_complete
    # The client's EndOfEarlyData and Finished still complete the server's side.
    server.receive_data(client.data_to_send())
    assert server.handshake_complete
    assert server.negotiated is not None and server.negotiated.early_data == "accepted"


def test_half_rtt_records_are_sealed_with_the_server_application_keys_from_sequence_zero() -> None:
    client, server = _server_flight(_with_ticket())
    flight = server.data_to_send()
    server.send_application_data(b"one")
    server.send_application_data(b"two")
    half_rtt = server.data_to_send()
    client.receive_data(flight)
    # The flight's records were under the handshake keys; the client now reads with the
    # server's first application traffic keys, at record 0 (RFC 8446 §5.3).
    assert client.traffic_secrets().read.seq == 0
    client.receive_data(half_rtt)
    assert [e.data for e in drain(client) if isinstance(e, ApplicationData)] == [b"one", b"two"]
    assert client.traffic_secrets().read.seq == 2
    # The NewSessionTickets after the client's Finished continue that sequence: the
    # client opens them (a wrong nonce would fail the AEAD) and stays in step.
    server.receive_data(client.data_to_send())
    tickets = server.data_to_send()
    assert tickets
    client.receive_data(tickets)
    assert client.traffic_secrets().read.seq == server.traffic_secrets().write.seq > 2
    server.send_application_data(b"three")
    client.receive_data(server.data_to_send())
    assert ApplicationData(b"three") in drain(client)


def test_resumption_without_early_data_may_also_send_half_rtt_data() -> None:
    client, server = _server_flight(_with_ticket(), early=b"")
    assert server.can_send_application_data
    server.send_application_data(ANSWER)
    client.receive_data(server.data_to_send())
    assert ApplicationData(ANSWER) in drain(client)
    assert not server.handshake_complete


def test_server_refuses_application_data_before_its_own_flight() -> None:
    server = ServerConnection(_with_ticket().server(), now=T0 + 2)
    assert not server.can_send_application_data
    with pytest.raises(LocalProtocolError):
        server.send_application_data(ANSWER)


def test_full_mtls_handshake_sends_nothing_before_the_clients_certificate_and_finished() -> None:
    config = server_config()
    assert config.require_client_certificate
    client = ClientConnection(client_config(), "x.example.org", now=T0)
    server = ServerConnection(config, now=T0)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    # The server's Finished is out and its application keys are installed, but the
    # client is not authenticated yet (RFC 8446 §4.4.4's note): no 0.5-RTT data.
    assert not server.can_send_application_data
    with pytest.raises(LocalProtocolError, match="handshake not complete"):
        server.send_application_data(ANSWER)
    assert server.data_to_send() == b""
    server.receive_data(client.data_to_send())
    assert server.handshake_complete and server.can_send_application_data


def test_full_handshake_without_client_certificates_sends_nothing_before_the_finished_either() -> (
    None
):
    # Not needed for authentication there (the client is anonymous anyway), but a full
    # handshake has no early data to answer: the window is a resumption's only.
    client = ClientConnection(client_config(), "x.example.org", now=T0)
    server = ServerConnection(server_config(require_client_certificate=False), now=T0)
    server.receive_data(client.data_to_send())
    assert not server.can_send_application_data
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    assert server.handshake_complete and server.can_send_application_data


def test_client_never_sends_application_data_before_its_finished() -> None:
    client = ClientConnection(client_config(), "x.example.org", now=T0)
    assert not client.can_send_application_data
    with pytest.raises(LocalProtocolError):
        client.send_application_data(REQUEST)


def test_half_rtt_window_closes_with_the_connection() -> None:
    _, server = _server_flight(_with_ticket())
    server.close()
    assert not server.can_send_application_data
    with pytest.raises(LocalProtocolError, match="closed for writing"):
        server.send_application_data(ANSWER)


# --- OpenSSL 4.0 as the client ----------------------------------------------------------


def test_openssl_client_reads_half_rtt_data_before_our_server_has_its_finished() -> None:
    """OpenSSL (pyOpenSSL's bindings; the memory-BIO harness of the other interop tests)
    resumes with early data; our server answers it at once, and OpenSSL's `SSL_read`
    returns the answer before its Finished has reached the server."""
    config = _server_config()
    ctx, session = _openssl_session_from(config)
    client = _openssl_client(ctx, session)
    written = ffi.new("size_t *")
    assert lib.SSL_write_early_data(client._ssl, EARLY, len(EARLY), written) == 1
    server = ServerConnection(config, now=REAL_NOW)
    server.receive_data(_bio_read(client), now=REAL_NOW)
    assert ApplicationData(EARLY, early=True) in list(server.events())
    server.send_application_data(ANSWER)
    client.bio_write(server.data_to_send())
    got = b""
    for _ in range(4):  # the handshake's end, then the answer's record
        try:
            got += client.recv(65536)
        except SSL.WantReadError:
            continue
        if len(got) >= len(ANSWER):
            break
    assert got == ANSWER
    # OpenSSL returned the answer while still in its early-data state: its
    # EndOfEarlyData and Finished were not even written yet.
    assert _bio_read(client) == b""
    assert not server.handshake_complete
    # Finishing its handshake writes them, and they complete our side; the early data
    # was accepted and the session resumed.
    with contextlib.suppress(SSL.WantReadError):
        client.do_handshake()
    server.receive_data(_bio_read(client), now=REAL_NOW)
    assert server.handshake_complete
    info = server.negotiated
    assert info is not None and info.session_resumed and info.early_data == "accepted"
