"""RFC 8448 §6 "Client Authentication", reproduced byte for byte by the client engine.

The server (ECDSA P-256 certificate) sends a CertificateRequest; the client answers
with the RSA certificate of RFC 8448 §2, an rsa_pss_rsae_sha256 CertificateVerify and
Finished, all in one record. RSA-PSS signatures are randomised, so the RFC's signature
is injected - after checking that the engine asked to sign exactly the RFC's input and
that the signature verifies under the certificate's key.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.tls import ClientConnection, HandshakeComplete, NamedGroup, TLSConfig
from sidecar.tls.connection import Connection
from sidecar.tls.groups import ClientKeyShare
from sidecar.tls.messages import (
    pull_certificate,
    pull_certificate_request,
    pull_client_hello,
    push_certificate_request,
)
from sidecar.tls.signatures import SignatureScheme, verify

from .pki import NOW

H = bytes.fromhex

CLIENT_X25519_PRIVATE = H("c040b2bb8f3addd20fd4058c547003a3c6f9c1cd915d5e535c87d8d191aaf071")
RECORD_CLIENT_HELLO = H(
    "16030100c0010000bc03036a472236328b83af40386d3a3e1f1ce624fa4ed89ab865a4ff0f4144ce3ae233000006"
    "1301130313020100008d0000000b0009000006736572766572ff01000100000a00140012001d0017001800190100"
    "0101010201030104003300260024001d0020089cc2671f738d9a671e5b2e464981d05b76e361aa22aea91f1d49ca"
    "10a7a362002b0003020304000d0020001e0403050306030203080408050806040105010601020104020502060202"
    "02002d00020101001c00024001"
)
RECORD_SERVER_HELLO = H(
    "160303005a0200005603033b50fdf1c3d572e40e68953e7fff4e2758459c59afa0582c0ea032874255fe6e001301"
    "00002e00330024001d00206c2e50e865919a6b5a12dfaf918f92b442567b0f89bc54478c6921366658f062002b00"
    "020304"
)
RECORD_SERVER_FLIGHT = H(
    "17030302166d0a7ac079b32a94aa68c4e2893e8bd0d3c185f549c236fbbce3d647f08f3c94a2bf424d8708883605"
    "ad8955f97718b0213dead13dfb23ebb8381da582756612bcb5a5d40847719fbe9f179bfae656f3ecfd59a4c0d351"
    "32ce418a7e46f6b6a60622f8a6c06b28d83360163563be9c37f97eb902326924a72b3ed8c8381277d1581cab9c37"
    "15ac2401398467ad7ebfab3d0c3419e750104f7d62c5027901f2e4cd4ca5b8071eb03d3c732d83215066dfc4d291"
    "d4c1ff3b8d7e4298f677d4d51dea1168d8f16cb27ba40266313a1fedf9e23cc77f765450f9e96f05d08f3da245b1"
    "4d4946f07ec81eed6d56f26bd574f0b7f7c7047037c16fce3b23754e662fad73e2b7213f6af296769c99a1d38e62"
    "32e0ec8dc4f84d6aa6f7de3887be0057862f9018e0ab396705aa4090ab5f2dff6325a557e7320d4effd46bb4f997"
    "d163207cce6665294aa4465541e3fe37ee7350659ea550d6dcb6af3c518852c7a14c3cc15bc32b3273bdf1751da1"
    "84203135b117d300204fb12d58ca9ac34b68eca27030832f7a4b46d2a55757f63fe8f6e85ac47469e6198da88a64"
    "586bf23c69590de822263be75fd836847240c48f8c145cd6bd698962e7edc234ebe59231351eef8d7652cf3b08ab"
    "3af6e5ec74c58a8da34b39f9b0d6c4279a9a1f82071729e7059dd7f7b95b9433c4684ce1891a6d33432d52eddb0b"
    "8cee9181d403eccc12991f1ad4aa62c36049713a7bb135fdda6661a05a93f8c16f"
)
CERTIFICATE_REQUEST = H(
    "0d000027000024000d0020001e040305030603020308040805080604010501060102010402050206020202"
)
# The client's Certificate message of §6 (CN=client, RSA key of RFC 8448 §2).
CLIENT_CERTIFICATE_MESSAGE = H(
    "0b0001bf000001bb0001b6308201b23082011ba003020102020101300d06092a864886f70d01010b05003011310f"
    "300d06035504031306636c69656e74301e170d3136303733303031323335395a170d323630373330303132333539"
    "5a3011310f300d06035504031306636c69656e7430819f300d06092a864886f70d010101050003818d0030818902"
    "818100c38175e004a68d093f823b9c379d201fbc0bb7a1c791905e3fbf76847e44e751ebbcd360bd945c81e5222b"
    "cc8846d3a8a0f93e9bf5bebabd92edf1de1ff19021703e7ab6c0901513f97e39b111f09c9348971c7b211984a754"
    "cd45fe095af0ea4236829bccf7a7fe9b2888e78ab477690a5b9e1ccbe91c6a4a0f97a7e02842010203010001a31a"
    "301830090603551d1304023000300b0603551d0f040403020780300d06092a864886f70d01010b0500038181001a"
    "7a5a018532b022af0767d486160cff2d167a1915d23835b54594916dc680be5d2e626076c5d52722ebcc775d7d99"
    "f980be2fc94d34acf6cc00ba90cbcfb0608aa1e7e3971ef0c07a41d47ad8345d1f81fe418a1cf41054429fd217bd"
    "777dc1cf08f05df90799c659361e0f1a8ee4ac0f7897420bdbc823da80a2f2ba23081c0000"
)
CLIENT_MESSAGE_TO_SIGN = (
    b" " * 64
    + b"TLS 1.3, client CertificateVerify\x00"
    + H("44026ef3331bc864da1c08ee32e196d93cc2c5d487e47e957d980e7c3d801b9a")
)
CLIENT_SIGNATURE = H(
    "186b2223b503a759c35dba0e9721b4b579138d5f0f5e6ec7feaaf27f3ad7f386c2c7bd7cb2be52fbf5ed8393f406"
    "ee79369692ec7ac695651d858219e672a8eb7b2a677b640b46ab630edc5f3f2f8272b9c0d906f81f84ddc5b8c7bc"
    "f955c78a3cf99e5016f73e04eb7dfcb28833f13e8f75ec2ff3581e2f098ad4157fd6d6ad"
)
RECORD_CLIENT_FLIGHT = H(
    "1703030280b46a63934e673841abaf267403bc677f6b6d2a1e2f12bb5f62683bfe36a82673f06d6287ddd609bcf2"
    "f5fd3225923d24af3c76682c180ee571a17ca4bfbe2f510dc9a0e1fca5cff2cee87d11cb531a6ef90bf5309a6b63"
    "bbbc0b88ea45103a4304091543859fa11ec032ed873444cd5185ead5f6a76420f0f0286acef802c8e4788c23275f"
    "1b06da600f4a7decd0bc59d7bef10e649ae32690397fc3d4ed6f30f801d8cd569b71ad4fa05ea7cf2ac2dfa150d2"
    "20505d4011b34d09d53853eba61a101e4f8dca47d8171a884b19259a3dd48c5ac141983edc77814d25e7f66bbbdb"
    "9096839266e06561828ecfb27eafd4e9e81a0b96e3bfa42dae5ad80359b9a6661402c3a2104177030106dbd8f65b"
    "b6a0159d512eb13af22a259f313bd58c2e21fe053d57f2a962b0a4ea682c96f70b79b560136192823b27be6a2fb7"
    "b1c751ccc0e3303615541485b7b307b423332c11efa80b72f9b80a53e53f7bb38a3af4c59f8008bad0544e5614e6"
    "88ff57bccd6935f81f447f420c1c1bf4058818e90bf5dc716ccae42524856df8250bcdbd7af65f82dd53061d024f"
    "6d2ff5c11e3792a9a70e0ee2a3c20a1b968ac391f8f92831135d25242ada2fe241c2653ec996339dfa12dfae7a33"
    "73df88b07ca27aef6dc266a25f13f75c76039c1f46fd7a53ae6399c999f4b2aee18e480d6d12bfae226bbdc92a6a"
    "d50b4d3bac7abc3b3651eb5be56f33bf41127b3ca886dc714a50d1490357bd40d9fd6be42209a4ddb9ebb2987e29"
    "f120f05814614d2c79320015b461fe7324447670a1af5f65caed15b474ab7faa495016adf808e53b94ef54afbb0e"
    "0a3a2732ab597f7d5923c77386aa5124731f8cc73e703b341c175a454939a77ab64313c15cf3fe03c4f338425649"
    "76"
)
RECORD_CLIENT_CLOSE_NOTIFY = H("1703030013e4ad7d44c29245339d355962c779b89ef44c58")
RECORD_SERVER_CLOSE_NOTIFY = H("17030300131decc5d6e64bba8a6f21b4fd077497da2a90cb")


def _scripted_rng(*chunks: bytes) -> Callable[[int], bytes]:
    queue = list(chunks)
    return lambda n: queue.pop(0)


def test_certificate_request_round_trips_and_lists_signature_algorithms() -> None:
    request = pull_certificate_request(CERTIFICATE_REQUEST[4:])
    assert request.request_context == b""
    assert push_certificate_request(request) == CERTIFICATE_REQUEST


def test_client_engine_reproduces_rfc8448_section6_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sidecar.tls.client as client_module

    rsa_cert = pull_certificate(CLIENT_CERTIFICATE_MESSAGE[4:]).entries[0].cert_data
    from cryptography import x509

    certificate = x509.load_der_x509_certificate(rsa_cert)
    public_key = certificate.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    # The RFC's signature really is a signature over the RFC's input by that key.
    verify(
        public_key,
        SignatureScheme.rsa_pss_rsae_sha256,
        CLIENT_SIGNATURE,
        CLIENT_MESSAGE_TO_SIGN,
        False,
    )

    asked: list[tuple[int, bytes]] = []

    def rfc_signature(key: object, scheme: int, data: bytes) -> bytes:
        asked.append((scheme, data))
        return CLIENT_SIGNATURE

    monkeypatch.setattr(client_module, "sign", rfc_signature)
    stand_in_key = rsa.generate_private_key(65537, 1024)  # the RFC key signs via injection
    config = TLSConfig(
        rng=_scripted_rng(),
        certificate_chain=(certificate,),
        private_key=stand_in_key,
        verify_peer=False,
        middlebox_compatibility=False,
    )
    client = ClientConnection.__new__(ClientConnection)
    Connection.__init__(client, config, NOW)
    share = ClientKeyShare(NamedGroup.x25519, _scripted_rng(CLIENT_X25519_PRIVATE))
    client._start(pull_client_hello(RECORD_CLIENT_HELLO[9:]), [share], "server")
    assert client.data_to_send() == RECORD_CLIENT_HELLO

    client.receive_data(RECORD_SERVER_HELLO + RECORD_SERVER_FLIGHT)
    assert asked == [(SignatureScheme.rsa_pss_rsae_sha256, CLIENT_MESSAGE_TO_SIGN)]
    assert client.data_to_send() == RECORD_CLIENT_FLIGHT
    done = [e for e in client.events() if isinstance(e, HandshakeComplete)]
    assert done[0].signature_scheme == SignatureScheme.ecdsa_secp256r1_sha256
    client.receive_data(RECORD_SERVER_CLOSE_NOTIFY)
    client.close()
    assert client.data_to_send() == RECORD_CLIENT_CLOSE_NOTIFY
