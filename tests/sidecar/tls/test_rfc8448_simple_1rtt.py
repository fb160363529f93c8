"""RFC 8448 §3 "Simple 1-RTT Handshake", reproduced byte for byte.

The client engine is driven with the RFC's own ClientHello (it offers extensions we
never send: renegotiation_info, session_ticket, record_size_limit), its X25519 private
key, and the server's recorded records; every record the client then produces must be
the RFC's. The server engine is fed the RFC's ClientHello with the RFC's random and
ephemeral key and must produce the RFC's ServerHello record and handshake secrets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from sidecar.tls import (
    AlertReceived,
    ApplicationData,
    ClientConnection,
    ConnectionClosed,
    HandshakeComplete,
    NamedGroup,
    PeerCertificate,
    ServerConnection,
    SessionTicket,
    TLSConfig,
)
from sidecar.tls.connection import Connection
from sidecar.tls.groups import ClientKeyShare
from sidecar.tls.keyschedule import EarlySecret, finished_verify_data, resumption_psk, traffic_keys
from sidecar.tls.messages import (
    pull_certificate,
    pull_certificate_verify,
    pull_client_hello,
    pull_encrypted_extensions,
    pull_new_session_ticket,
    pull_server_hello,
    push_certificate,
    push_certificate_verify,
    push_client_hello,
    push_encrypted_extensions,
    push_new_session_ticket,
    push_server_hello,
)
from sidecar.tls.record import ContentType, RecordProtection
from sidecar.tls.suites import SUITES, CipherSuite

from .pki import NOW, identity

H = bytes.fromhex
P = SUITES[CipherSuite.AES_128_GCM_SHA256]

# {client} ephemeral X25519 key and {server} ephemeral key (§3).
CLIENT_PRIVATE = H("49af42ba7f7994852d713ef2784bcbcaa7911de26adc5642cb634540e7ea5005")
SERVER_PRIVATE = H("b1580eeadf6dd589b8ef4f2d5652578cc810e9980191ec8d058308cea216a21e")
SERVER_RANDOM = H("a6af06a4121860dc5e6e60249cd34c95930c8ac5cb1434dac155772ed3e26928")

CLIENT_HELLO = H(
    "010000c00303cb34ecb1e78163ba1c38c6dacb196a6dffa21a8d9912ec18a2ef"
    "6283024dece7000006130113031302010000910000000b000900000673657276"
    "6572ff01000100000a00140012001d0017001800190100010101020103010400"
    "230000003300260024001d002099381de560e4bd43d23d8e435a7dbafeb3c06e"
    "51c13cae4d5413691e529aaf2c002b0003020304000d0020001e040305030603"
    "020308040805080604010501060102010402050206020202002d00020101001c"
    "00024001"
)
SERVER_HELLO = H(
    "020000560303a6af06a4121860dc5e6e60249cd34c95930c8ac5cb1434dac155"
    "772ed3e2692800130100002e00330024001d0020c9828876112095fe66762bdb"
    "f7c672e156d6cc253b833df1dd69b1b04e751f0f002b00020304"
)
# EncryptedExtensions || Certificate || CertificateVerify || Finished (657 octets).
SERVER_FLIGHT = H(
    "080000240022000a00140012001d00170018001901000101010201030104001c"
    "00024001000000000b0001b9000001b50001b0308201ac30820115a003020102"
    "020102300d06092a864886f70d01010b0500300e310c300a0603550403130372"
    "7361301e170d3136303733303031323335395a170d3236303733303031323335"
    "395a300e310c300a0603550403130372736130819f300d06092a864886f70d01"
    "0101050003818d0030818902818100b4bb498f8279303d980836399b36c6988c"
    "0c68de55e1bdb826d3901a2461eafd2de49a91d015abbc9a95137ace6c1af19e"
    "aa6af98c7ced43120998e187a80ee0ccb0524b1b018c3e0b63264d449a6d38e2"
    "2a5fda430846748030530ef0461c8ca9d9efbfae8ea6d1d03e2bd193eff0ab9a"
    "8002c47428a6d35a8d88d79f7f1e3f0203010001a31a301830090603551d1304"
    "023000300b0603551d0f0404030205a0300d06092a864886f70d01010b050003"
    "81810085aad2a0e5b9276b908c65f73a7267170618a54c5f8a7b337d2df7a594"
    "365417f2eae8f8a58c8f8172f9319cf36b7fd6c55b80f21a03015156726096fd"
    "335e5e67f2dbf102702e608ccae6bec1fc63a42a99be5c3eb7107c3c54e9b9eb"
    "2bd5203b1c3b84e0a8b2f759409ba3eac9d91d402dcc0cc8f8961229ac9187b4"
    "2b4de100000f000084080400805a747c5d88fa9bd2e55ab085a61015b7211f82"
    "4cd484145ab3ff52f1fda8477b0b7abc90db78e2d33a5c141a078653fa6bef78"
    "0c5ea248eeaaa785c4f394cab6d30bbe8d4859ee511f602957b15411ac027671"
    "459e46445c9ea58c181e818e95b8c3fb0bf3278409d3be152a3da5043e063dda"
    "65cdf5aea20d53dfacd42f74f3140000209b9b141d906337fbd2cbdce71df4de"
    "da4ab42c309572cb7fffee5454b78f0718"
)
EE_LEN, CERT_LEN, CV_LEN = 40, 445, 136
NEW_SESSION_TICKET = H(
    "040000c90000001efad6aac502000000b22c035d829359ee5ff7af4ec9000000"
    "00262a6494dc486d2c8a34cb33fa90bf1b0070ad3c498883c9367c09a2be785a"
    "bc55cd226097a3a982117283f82a03a143efd3ff5dd36d64e861be7fd61d2827"
    "db279cce145077d454a3664d4e6da4d29ee03725a6a4dafcd0fc67d2aea70529"
    "513e3da2677fa5906c5b3f7d8f92f228bda40dda721470f9fbf297b5aea61764"
    "6fac5c03272e970727c621a79141ef5f7de6505e5bfbc388e93343694093934a"
    "e4d3570008002a000400000400"
)

RECORD_SERVER_HELLO = H("160303005a") + SERVER_HELLO
RECORD_SERVER_FLIGHT = H(
    "17030302a2d1ff334a56f5bff6594a07cc87b580233f500f45e489e7f33af35e"
    "df7869fcf40aa40aa2b8ea73f848a7ca07612ef9f945cb960b4068905123ea78"
    "b111b429ba9191cd05d2a389280f526134aadc7fc78c4b729df828b5ecf7b13b"
    "d9aefb0e57f271585b8ea9bb355c7c79020716cfb9b1183ef3ab20e37d57a6b9"
    "d7477609aee6e122a4cf51427325250c7d0e509289444c9b3a648f1d71035d2e"
    "d65b0e3cdd0cbae8bf2d0b227812cbb360987255cc744110c453baa4fcd61092"
    "8d809810e4b7ed1a8fd991f06aa6248204797e36a6a73b70a2559c09ead68694"
    "5ba246ab66e5edd8044b4c6de3fcf2a89441ac66272fd8fb330ef8190579b368"
    "4596c960bd596eea520a56a8d650f563aad27409960dca63d3e688611ea5e22f"
    "4415cf9538d51a200c27034272968a264ed6540c84838d89f72c24461aad6d26"
    "f59ecaba9acbbb317b66d902f4f292a36ac1b639c637ce343117b65962224531"
    "7b49eeda0c6258f100d7d961ffb138647e92ea330faeea6dfa31c7a84dc3bd7e"
    "1b7a6c7178af36879018e3f252107f243d243dc7339d5684c8b0378bf30244da"
    "8c87c843f5e56eb4c5e8280a2b48052cf93b16499a66db7cca71e4599426f7d4"
    "61e66f99882bd89fc50800becca62d6c74116dbd2972fda1fa80f85df881edbe"
    "5a37668936b335583b599186dc5c6918a396fa48a181d6b6fa4f9d62d513afbb"
    "992f2b992f67f8afe67f76913fa388cb5630c8ca01e0c65d11c66a1e2ac4c859"
    "77b7c7a6999bbf10dc35ae69f5515614636c0b9b68c19ed2e31c0b3b66763038"
    "ebba42f3b38edc0399f3a9f23faa63978c317fc9fa66a73f60f0504de93b5b84"
    "5e275592c12335ee340bbc4fddd502784016e4b3be7ef04dda49f4b440a30cb5"
    "d2af939828fd4ae3794e44f94df5a631ede42c1719bfdabf0253fe5175be898e"
    "750edc53370d2b"
)
RECORD_CLIENT_FINISHED = H(
    "170303003575ec4dc238cce60b298044a71e219c56cc77b0517fe9b93c7a4bfc"
    "44d87f38f80338ac98fc46deb384bd1caeacab6867d726c40546"
)
RECORD_TICKET = H(
    "17030300de3a6b8f90414a97d6959c3487680de5134a2b240e6cffac116e95d4"
    "1d6af8f6b580dcf3d11d63c758db289a015940252f55713e061dc13e078891a3"
    "8efbcf5753ad8ef170ad3c7353d16d9da773b9ca7f2b9fa1b6c0d4a3d03f75e0"
    "9c30ba1e62972ac46f75f7b981be63439b2999ce13064615139891d5e4c5b406"
    "f16e3fc181a77ca475840025db2f0a77f81b5ab05b94c01346755f69232c8651"
    "9d86cbeeac87aac347d143f9605d64f650db4d023e70e952ca49fe5137121c74"
    "bc2697687e248746d6df353005f3bce18696129c8153556b3b6c6779b37bf159"
    "85684f"
)
RECORD_CLIENT_DATA = H(
    "1703030043a23f7054b62c94d0affafe8228ba55cbefacea42f914aa66bcab3f"
    "2b9819a8a5b46b395bd54a9a20441e2b62974e1f5a6292a2977014bd1e3deae6"
    "3aeebb21694915e4"
)
RECORD_SERVER_DATA = H(
    "17030300432e937e11ef4ac740e538ad36005fc4a46932fc3225d05f82aa1b36"
    "e30efaf97d90e6dffc602dcb501a59a8fcc49c4bf2e5f0a21c0047c2abf33254"
    "0dd032e167c2955d"
)
RECORD_CLIENT_ALERT = H("1703030013c9872760655666b74d7ff1153efd6db6d0b0e3")
RECORD_SERVER_ALERT = H("1703030013b58fd67166ebf599d24720cfbe7efa7a8864a9")
APPLICATION_DATA = bytes(range(0x32))

ECDHE = H("8bd4054fb55b9d63fdfbacf9f04b9f0d35e6d63f537563efd46272900f89492d")
EARLY_SECRET = H("33ad0a1c607ec03b09e6cd9893680ce210adf300aa1f2660e1b22e10f170f92a")
HANDSHAKE_SECRET = H("1dc826e93606aa6fdc0aadc12f741b01046aa6b99f691ed221a9f0ca043fbeac")
HELLO_HASH = H("860c06edc07858ee8e78f0e7428c58edd6b43f2ca3e6e95f02ed063cf0e1cad8")
CLIENT_HS = H("b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21")
SERVER_HS = H("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
MASTER_SECRET = H("18df06843d13a08bf2a449844c5f8a478001bc4d4c627984d5a41da8d0402919")
SERVER_FINISHED_HASH = H("9608102a0f1ccc6db6250b7b7e417b1a000eaada3daae4777a7686c9ff83df13")
CLIENT_AP = H("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")
SERVER_AP = H("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
EXPORTER = H("fe22f881176eda18eb8f44529e6792c50c9a3f89452f68d8ae311b4309d3cf50")
RESUMPTION_MASTER = H("7df235f2031d2a051287d02b0241b0bfdaf86cc856231f2d5aba46c434ec196c")
TICKET_PSK = H("4ecd0eb6ec3b4d87f5d6028f922ca4c5851a277fd41311c9e62d2c9492e1c4f3")
SERVER_VERIFY_DATA = H("9b9b141d906337fbd2cbdce71df4deda4ab42c309572cb7fffee5454b78f0718")
CLIENT_VERIFY_DATA = H("a8ec436d677634ae525ac1fcebe11a039ec17694fac6e98527b642f2edd5ce61")
KEYS = {
    "server handshake": (SERVER_HS, "3fce516009c21727d0f2e4e86ee403bc", "5d313eb2671276ee13000b30"),
    "client handshake": (CLIENT_HS, "dbfaa693d1762c5b666af5d950258d01", "5bd3c71b836e0b76bb73265f"),
    "server application": (
        SERVER_AP,
        "9f02283b6c9c07efc26bb9f2ac92e356",
        "cf782b88dd83549aadf1e984",
    ),
    "client application": (
        CLIENT_AP,
        "17422dda596ed5d9acd890e3c63f5051",
        "5b78923dee08579033e523d9",
    ),
}


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _scripted_rng(*chunks: bytes) -> Callable[[int], bytes]:
    queue = list(chunks)

    def rng(n: int) -> bytes:
        value = queue.pop(0)
        assert len(value) == n
        return value

    return rng


def test_key_schedule_reproduces_every_rfc8448_section3_secret() -> None:
    early = EarlySecret.start(P)
    assert early.secret == EARLY_SECRET
    hs = early.handshake(ECDHE)
    assert hs.secret == HANDSHAKE_SECRET
    assert _sha256(CLIENT_HELLO + SERVER_HELLO) == HELLO_HASH
    assert hs.client_traffic_secret(HELLO_HASH) == CLIENT_HS
    assert hs.server_traffic_secret(HELLO_HASH) == SERVER_HS
    transcript = CLIENT_HELLO + SERVER_HELLO + SERVER_FLIGHT
    assert _sha256(transcript) == SERVER_FINISHED_HASH
    assert finished_verify_data(P, SERVER_HS, _sha256(transcript[:-36])) == SERVER_VERIFY_DATA
    master = hs.master()
    assert master.secret == MASTER_SECRET
    assert master.client_application_traffic_secret(SERVER_FINISHED_HASH) == CLIENT_AP
    assert master.server_application_traffic_secret(SERVER_FINISHED_HASH) == SERVER_AP
    assert master.exporter_master_secret(SERVER_FINISHED_HASH) == EXPORTER
    assert finished_verify_data(P, CLIENT_HS, SERVER_FINISHED_HASH) == CLIENT_VERIFY_DATA
    client_finished = H("14000020") + CLIENT_VERIFY_DATA
    rms = master.resumption_master_secret(_sha256(transcript + client_finished))
    assert rms == RESUMPTION_MASTER
    assert resumption_psk(P, rms, b"\x00\x00") == TICKET_PSK


def test_traffic_keys_and_ivs_match_rfc8448_section3() -> None:
    for name, (secret, key, iv) in KEYS.items():
        keys = traffic_keys(P, secret)
        assert (keys.key.hex(), keys.iv.hex()) == (key, iv), name


def test_the_ecdhe_secret_follows_from_the_rfc_private_keys() -> None:
    share = ClientKeyShare(NamedGroup.x25519, _scripted_rng(CLIENT_PRIVATE))
    assert share.complete(SERVER_HELLO[-38:-6]) == ECDHE


def test_every_rfc8448_handshake_message_round_trips_byte_identically() -> None:
    assert push_client_hello(pull_client_hello(CLIENT_HELLO[4:])) == CLIENT_HELLO
    assert push_server_hello(pull_server_hello(SERVER_HELLO[4:])) == SERVER_HELLO
    ee = SERVER_FLIGHT[:EE_LEN]
    cert = SERVER_FLIGHT[EE_LEN : EE_LEN + CERT_LEN]
    cv = SERVER_FLIGHT[EE_LEN + CERT_LEN : EE_LEN + CERT_LEN + CV_LEN]
    assert push_encrypted_extensions(pull_encrypted_extensions(ee[4:])) == ee
    assert push_certificate(pull_certificate(cert[4:])) == cert
    assert push_certificate_verify(pull_certificate_verify(cv[4:])) == cv
    assert (
        push_new_session_ticket(pull_new_session_ticket(NEW_SESSION_TICKET[4:]))
        == NEW_SESSION_TICKET
    )


def test_record_protection_reproduces_the_rfc8448_records() -> None:
    def protect(name: str, content_type: int, fragment: bytes, seq: int = 0) -> bytes:
        secret, _key, _iv = KEYS[name]
        protection = RecordProtection(P, traffic_keys(P, secret))
        protection.seq = seq
        return protection.seal(content_type, fragment)

    assert protect("server handshake", ContentType.handshake, SERVER_FLIGHT) == RECORD_SERVER_FLIGHT
    finished = H("14000020") + CLIENT_VERIFY_DATA
    assert protect("client handshake", ContentType.handshake, finished) == RECORD_CLIENT_FINISHED
    assert protect("server application", ContentType.handshake, NEW_SESSION_TICKET) == RECORD_TICKET
    assert (
        protect("client application", ContentType.application_data, APPLICATION_DATA)
        == RECORD_CLIENT_DATA
    )
    assert (
        protect("server application", ContentType.application_data, APPLICATION_DATA, 1)
        == RECORD_SERVER_DATA
    )
    assert protect("client application", ContentType.alert, b"\x01\x00", 1) == RECORD_CLIENT_ALERT
    assert protect("server application", ContentType.alert, b"\x01\x00", 2) == RECORD_SERVER_ALERT


def _rfc_client(lines: list[str]) -> ClientConnection:
    config = TLSConfig(
        rng=_scripted_rng(), verify_peer=False, middlebox_compatibility=False, key_log=lines.append
    )
    client = ClientConnection.__new__(ClientConnection)
    Connection.__init__(client, config, NOW)
    # The RFC's ClientHello is an input (it carries extensions we never send), and so
    # is its ephemeral key; everything after it is the engine's own work.
    share = ClientKeyShare(NamedGroup.x25519, _scripted_rng(CLIENT_PRIVATE))
    client._start(pull_client_hello(CLIENT_HELLO[4:]), [share], "server")
    return client


def test_client_engine_reproduces_rfc8448_section3_byte_for_byte() -> None:
    lines: list[str] = []
    client = _rfc_client(lines)
    assert client.data_to_send() == H("16030100c4") + CLIENT_HELLO
    client.receive_data(RECORD_SERVER_HELLO)
    client.receive_data(RECORD_SERVER_FLIGHT)
    assert client.data_to_send() == RECORD_CLIENT_FINISHED
    events = list(client.events())
    assert isinstance(events[0], PeerCertificate)
    done = events[1]
    assert isinstance(done, HandshakeComplete) and done.signature_scheme == 0x0804
    secrets = {line.split()[0]: bytes.fromhex(line.split()[2]) for line in lines}
    assert secrets == {
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET": CLIENT_HS,
        "SERVER_HANDSHAKE_TRAFFIC_SECRET": SERVER_HS,
        "CLIENT_TRAFFIC_SECRET_0": CLIENT_AP,
        "SERVER_TRAFFIC_SECRET_0": SERVER_AP,
        "EXPORTER_SECRET": EXPORTER,
    }
    client.receive_data(RECORD_TICKET)
    (ticket,) = client.events()
    assert isinstance(ticket, SessionTicket)
    assert (ticket.lifetime, ticket.psk, ticket.max_early_data_size) == (30, TICKET_PSK, 1024)
    client.receive_data(RECORD_SERVER_DATA)
    assert list(client.events()) == [ApplicationData(APPLICATION_DATA)]
    client.send_application_data(APPLICATION_DATA)
    assert client.data_to_send() == RECORD_CLIENT_DATA
    client.receive_data(RECORD_SERVER_ALERT)
    assert list(client.events()) == [AlertReceived(1, 0), ConnectionClosed(clean=True)]
    client.close()
    assert client.data_to_send() == RECORD_CLIENT_ALERT
    secrets_now = client.traffic_secrets()
    assert (
        secrets_now.write.key.hex() == KEYS["client application"][1] and secrets_now.write.seq == 2
    )


def test_client_engine_fed_one_byte_at_a_time_matches_rfc8448() -> None:
    client = _rfc_client([])
    client.data_to_send()
    for byte in RECORD_SERVER_HELLO + RECORD_SERVER_FLIGHT:
        client.receive_data(bytes((byte,)))
    assert client.data_to_send() == RECORD_CLIENT_FINISHED


def test_server_engine_reproduces_the_rfc8448_server_hello_and_secrets() -> None:
    lines: list[str] = []
    ident = identity("server")
    config = TLSConfig(
        rng=_scripted_rng(SERVER_PRIVATE, SERVER_RANDOM),
        certificate_chain=ident.chain,
        private_key=ident.key,
        verify_peer=False,
        require_client_certificate=False,
        key_log=lines.append,
    )
    server = ServerConnection(config, now=NOW)
    server.receive_data(H("16030100c4") + CLIENT_HELLO)
    out = server.data_to_send()
    assert out[: len(RECORD_SERVER_HELLO)] == RECORD_SERVER_HELLO
    secrets = {line.split()[0]: bytes.fromhex(line.split()[2]) for line in lines}
    assert secrets["CLIENT_HANDSHAKE_TRAFFIC_SECRET"] == CLIENT_HS
    assert secrets["SERVER_HANDSHAKE_TRAFFIC_SECRET"] == SERVER_HS
    assert lines[0].split()[1] == CLIENT_HELLO[6:38].hex()
