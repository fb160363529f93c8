"""RFC 8448 §4 "Resumed 0-RTT Handshake", reproduced byte for byte.

The resumption of the §3 connection: the client offers the §3 ticket with its binder,
sends 0-RTT data, then EndOfEarlyData and Finished. The client engine is given the RFC's
ClientHello *without* its pre_shared_key extension (the hello carries extensions we never
send: padding, record_size_limit, renegotiation_info) and its X25519 key; it must write
the pre_shared_key extension, binder included, and every record after it as the RFC
does. The server engine gets the RFC's ClientHello and must verify the RFC's binder,
answer with the RFC's ServerHello and derive the RFC's secrets.

The one stand-in: the §3 ticket was sealed by the RFC authors' server under a key nobody
holds, so the server test's ring maps that one ticket to the state it stands for
(`_RfcTicketRing`); every other step is the engine's own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from cryptography.hazmat.primitives.serialization import Encoding

from sidecar.tls import (
    ApplicationData,
    ClientConnection,
    HandshakeComplete,
    NamedGroup,
    ServerConnection,
    SessionTicket,
    TLSConfig,
)
from sidecar.tls.connection import Connection
from sidecar.tls.extensions import ExtensionType
from sidecar.tls.groups import ClientKeyShare
from sidecar.tls.keyschedule import EarlySecret, finished_verify_data, traffic_keys
from sidecar.tls.messages import pull_client_hello, pull_new_session_ticket
from sidecar.tls.record import ContentType, RecordProtection
from sidecar.tls.replay import ReplayCache
from sidecar.tls.resumption import ClientOffer, bind_psk
from sidecar.tls.suites import SUITES, CipherSuite
from sidecar.tls.tickets import StekRing, TicketState, chain_sha256
from sidecar.tls.ticketstore import StoredTicket
from sidecar.tls.verify import insecure_peer

from .pki import NOW, identity

H = bytes.fromhex
P = SUITES[CipherSuite.AES_128_GCM_SHA256]

# §3: the ticket and the PSK it stands for (resumption secret, nonce 0x0000).
NEW_SESSION_TICKET = H(
    "040000c90000001efad6aac502000000b22c035d829359ee5ff7af4ec9000000"
    "00262a6494dc486d2c8a34cb33fa90bf1b0070ad3c498883c9367c09a2be785a"
    "bc55cd226097a3a982117283f82a03a143efd3ff5dd36d64e861be7fd61d2827"
    "db279cce145077d454a3664d4e6da4d29ee03725a6a4dafcd0fc67d2aea70529"
    "513e3da2677fa5906c5b3f7d8f92f228bda40dda721470f9fbf297b5aea61764"
    "6fac5c03272e970727c621a79141ef5f7de6505e5bfbc388e93343694093934a"
    "e4d3570008002a000400000400"
)
TICKET = pull_new_session_ticket(NEW_SESSION_TICKET[4:])
PSK = H("4ecd0eb6ec3b4d87f5d6028f922ca4c5851a277fd41311c9e62d2c9492e1c4f3")

# §4 {client} and {server} ephemeral X25519 keys, the server's random.
CLIENT_PRIVATE = H("bff91188283846dd6a2134ef7180ca2b0b14fb10dce707b5098c0dddc813b2df")
SERVER_PRIVATE = H("de5b4476e7b490b2652d338acbf2948066f255f9440e23b98fc69835298dc107")
SERVER_RANDOM = H("3ccfd2dec890222763472ae8136777c9d7358777bb66e91ea5122495f559ea2d")

# The ClientHello up to its binders ("truncated", §4.2.11.2), and the binders list.
CLIENT_HELLO_PREFIX = (
    H(
        "010001fc03031bc3ceb6bbe39cff938355b5a50adb6db21b7a6af649d7b4bc41"
        "9d7876487d95000006130113031302010001cd0000000b000900000673657276"
        "6572ff01000100000a00140012001d0017001800190100010101020103010400"
        "3300260024001d0020e4ffb68ac05f8d96c99da26698346c6be16482badddafe"
        "051a66b4f18d668f0b002a0000002b0003020304000d0020001e040305030603"
        "020308040805080604010501060102010402050206020202002d00020101001c"
        "0002400100150057"
    )
    + bytes(0x57)  # padding (RFC 7685) to 512 bytes
    + H(
        "002900dd00b800b22c035d829359ee5ff7af4ec900000000262a6494dc486d2c"
        "8a34cb33fa90bf1b0070ad3c498883c9367c09a2be785abc55cd226097a3a982"
        "117283f82a03a143efd3ff5dd36d64e861be7fd61d2827db279cce145077d454"
        "a3664d4e6da4d29ee03725a6a4dafcd0fc67d2aea70529513e3da2677fa5906c"
        "5b3f7d8f92f228bda40dda721470f9fbf297b5aea617646fac5c03272e970727"
        "c621a79141ef5f7de6505e5bfbc388e93343694093934ae4d357fad6aacb"
    )
)
BINDER = H("3add4fb2d8fdf822a0ca3cf7678ef5e88dae990141c5924d57bb6fa31b9e5f9d")
CLIENT_HELLO = CLIENT_HELLO_PREFIX + H("002120") + BINDER
SERVER_HELLO = H(
    "0200005c03033ccfd2dec890222763472ae8136777c9d7358777bb66e91ea512"
    "2495f559ea2d00130100003400290002000000330024001d0020121761ee42c3"
    "33e1b9e77b60dd57c2053cd94512ab47f115e86eff50942cea31002b00020304"
)
ENCRYPTED_EXTENSIONS = H(
    "080000280026000a00140012001d00170018001901000101010201030104001c0002400100000000002a0000"
)
SERVER_FINISHED = H("1400002048d3e0e1b3d907c6acff145e16090388c77b05c050b634ab1a88bbd0dd1a34b2")
END_OF_EARLY_DATA = H("05000000")
CLIENT_FINISHED = H("140000207230a9c952c25cd6138fc5e6628308c41c5335dd81b9f96bcea50fd32bda416d")
EARLY_DATA = H("414243444546")

EARLY_SECRET = H("9b2188e9b2fc6d64d71dc329900e20bb41915000f678aa839cbb797cb7d8332c")
BINDER_KEY = H("69fe131a3bbad5d63c64eebcc30e395b9d8107726a13d074e389dbc8a4e47256")
CLIENT_EARLY = H("3fbbe6a60deb66c30a32795aba0eff7eaa10105586e7be5c09678d63b6caab62")
CLIENT_HS = H("2faac08f851d35fea3604fcb4de82dc62c9b164a70974d0462e27f1ab278700f")
SERVER_HS = H("fe927ae271312e8bf0275b581c54eef020450dc4ecffaa05a1a35d27518e7803")
CLIENT_AP = H("2abbf2b8e381d23dbebe1dd2a7d16a8bf484cb4950d23fb7fb7fa8547062d9a1")
SERVER_AP = H("cc21f1bf8feb7dd5fa505bd9c4b468a9984d554a993dc49e6d285598fb672691")
EXPORTER = H("3fd93d4ffddc98e64b14dd107aedf8ee4add23f4510f58a4592d0b201bee56b4")
KEYS = {
    "early": (CLIENT_EARLY, "920205a5b7bf2115e6fc5c2942834f54", "6d475f0993c8e564610db2b9"),
    "server handshake": (SERVER_HS, "27c6bdc0a3dcea39a47326d79bc9e4ee", "9569ecdd4d0536705e9ef725"),
    "client handshake": (CLIENT_HS, "b1530806f4adfeac83f1413032bbfa82", "eb50c16be7654abf99dd06d9"),
    "server application": (
        SERVER_AP,
        "e857c690a34c5a9129d833619684f95e",
        "0685d6b561aab9ef1013faf9",
    ),
    "client application": (
        CLIENT_AP,
        "3cf122f301c6358ca7989553250efd72",
        "ab1aec26aa78b8fc1176b9ac",
    ),
}
# The client's view of the ticket's age: 6 ms (obfuscated fad6aacb - age_add fad6aac5).
NOW_S = NOW.timestamp()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _scripted_rng(*chunks: bytes) -> Callable[[int], bytes]:
    queue = list(chunks)

    def rng(n: int) -> bytes:
        value = queue.pop(0)
        assert len(value) == n
        return value

    return rng


def _seal(name: str, content_type: int, fragment: bytes, seq: int = 0) -> bytes:
    secret = KEYS[name][0]
    protection = RecordProtection(P, traffic_keys(P, secret))
    protection.seq = seq
    return protection.seal(content_type, fragment)


def _secrets(lines: list[str]) -> dict[str, bytes]:
    return {line.split()[0]: bytes.fromhex(line.split()[2]) for line in lines}


def test_key_schedule_reproduces_the_rfc8448_section4_early_secrets() -> None:
    early = EarlySecret.start(P, PSK)
    assert early.secret == EARLY_SECRET
    assert early.binder_key() == BINDER_KEY
    binder_hash = _sha256(CLIENT_HELLO_PREFIX)
    assert finished_verify_data(P, BINDER_KEY, binder_hash) == BINDER
    assert early.client_early_traffic_secret(_sha256(CLIENT_HELLO)) == CLIENT_EARLY
    for name, (secret, key, iv) in KEYS.items():
        keys = traffic_keys(P, secret)
        assert (keys.key.hex(), keys.iv.hex()) == (key, iv), name


def _rfc_offer() -> ClientOffer:
    ticket = SessionTicket(
        ticket=TICKET.ticket,
        lifetime=TICKET.ticket_lifetime,
        age_add=TICKET.ticket_age_add,
        nonce=TICKET.ticket_nonce,
        psk=PSK,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        max_early_data_size=1024,
        server_name="server",
        alpn_protocol=None,
        peer_spiffe_id=None,
    )
    # Received 6.5 ms before NOW: the obfuscated age comes out as the RFC's fad6aacb.
    stored = StoredTicket(ticket, NOW_S - 0.0065, 0)
    return ClientOffer(
        stored, P, insecure_peer([c.public_bytes(Encoding.DER) for c in identity("server").chain])
    )


def _rfc_client(lines: list[str]) -> ClientConnection:
    config = TLSConfig(
        rng=_scripted_rng(), verify_peer=False, middlebox_compatibility=False, key_log=lines.append
    )
    client = ClientConnection.__new__(ClientConnection)
    Connection.__init__(client, config, NOW)
    rfc = pull_client_hello(CLIENT_HELLO[4:])
    without_psk = tuple(e for e in rfc.extensions if e[0] != ExtensionType.pre_shared_key)
    hello = bind_psk(
        type(rfc)(
            rfc.random,
            rfc.legacy_session_id,
            rfc.cipher_suites,
            rfc.legacy_compression_methods,
            without_psk,
        ),
        _rfc_offer(),
        NOW_S,
        None,
    )
    share = ClientKeyShare(NamedGroup.x25519, _scripted_rng(CLIENT_PRIVATE))
    client._start(hello, [share], "server", _rfc_offer(), EARLY_DATA)
    return client


def test_client_engine_reproduces_rfc8448_section4_byte_for_byte() -> None:
    lines: list[str] = []
    client = _rfc_client(lines)
    # The ClientHello, binder included, then the 0-RTT record under the early key.
    assert client.data_to_send() == (
        H("1603010200") + CLIENT_HELLO + _seal("early", ContentType.application_data, EARLY_DATA)
    )
    client.receive_data(H("1603030060") + SERVER_HELLO)
    client.receive_data(
        _seal("server handshake", ContentType.handshake, ENCRYPTED_EXTENSIONS + SERVER_FINISHED)
    )
    # EndOfEarlyData under the early key (its second record), Finished under the client
    # handshake key.
    assert client.data_to_send() == _seal(
        "early", ContentType.handshake, END_OF_EARLY_DATA, seq=1
    ) + _seal("client handshake", ContentType.handshake, CLIENT_FINISHED)
    (done,) = [e for e in client.events() if isinstance(e, HandshakeComplete)]
    assert done.session_resumed and done.early_data == "accepted"
    assert _secrets(lines) == {
        "CLIENT_EARLY_TRAFFIC_SECRET": CLIENT_EARLY,
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET": CLIENT_HS,
        "SERVER_HANDSHAKE_TRAFFIC_SECRET": SERVER_HS,
        "CLIENT_TRAFFIC_SECRET_0": CLIENT_AP,
        "SERVER_TRAFFIC_SECRET_0": SERVER_AP,
        "EXPORTER_SECRET": EXPORTER,
    }
    client.send_application_data(EARLY_DATA)
    assert client.data_to_send() == _seal(
        "client application", ContentType.application_data, EARLY_DATA
    )


class _RfcTicketRing(StekRing):
    """Opens the one ticket of RFC 8448 §3 (see the module docstring), nothing else."""

    def open(self, ticket: bytes, now: float) -> bytes | None:
        if ticket != TICKET.ticket:
            return super().open(ticket, now)
        return TicketState(
            psk=PSK,
            cipher_suite=CipherSuite.AES_128_GCM_SHA256,
            alpn=None,
            peer_spiffe_id=None,
            chain_hash=chain_sha256(()),
            chain=(),
            issued_ms=int(NOW_S * 1000) - 6,
            lifetime=TICKET.ticket_lifetime,
            age_add=TICKET.ticket_age_add,
            max_early_data=1024,
            replica_id=b"rfc8448",
        ).encode()


def test_server_engine_verifies_the_rfc8448_binder_and_accepts_its_early_data() -> None:
    lines: list[str] = []
    ident = identity("server")
    config = TLSConfig(
        rng=_scripted_rng(SERVER_PRIVATE, SERVER_RANDOM),
        certificate_chain=ident.chain,
        private_key=ident.key,
        verify_peer=False,
        require_client_certificate=False,
        key_log=lines.append,
        ticket_ring=_RfcTicketRing(),
        session_tickets=0,
        replica_id=b"rfc8448",
        max_early_data=1024,
        replay_cache=ReplayCache(),
    )
    server = ServerConnection(config, now=NOW)
    server.receive_data(H("1603010200") + CLIENT_HELLO)
    out = server.data_to_send()
    assert out[:101] == H("1603030060") + SERVER_HELLO
    secrets = _secrets(lines)
    assert secrets["CLIENT_EARLY_TRAFFIC_SECRET"] == CLIENT_EARLY
    assert secrets["CLIENT_HANDSHAKE_TRAFFIC_SECRET"] == CLIENT_HS
    assert secrets["SERVER_HANDSHAKE_TRAFFIC_SECRET"] == SERVER_HS
    server.receive_data(_seal("early", ContentType.application_data, EARLY_DATA))
    assert list(server.events()) == [ApplicationData(EARLY_DATA, early=True)]
