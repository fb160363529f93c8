"""RFC 8448 §7 "Compatibility Mode" (Appendix D.4 middlebox compatibility).

The client sends a 32-byte legacy_session_id; the server echoes it and sends a dummy
change_cipher_spec before its encrypted flight, which the client must tolerate; the
client sends its own dummy change_cipher_spec right before its Finished. Reproduced byte
for byte by the client engine with the RFC's ClientHello and ephemeral key.
"""

from __future__ import annotations

from sidecar.tls import ClientConnection, ConnectionClosed, NamedGroup, TLSConfig
from sidecar.tls.connection import Connection
from sidecar.tls.groups import ClientKeyShare
from sidecar.tls.messages import pull_client_hello

from .pki import NOW

H = bytes.fromhex

CLIENT_X25519_PRIVATE = H("dea00b45695dc781f19d34a62c1afd31ab4369af1e855a3bbb258d8442cde6d7")
RECORD_CLIENT_HELLO = H(
    "16030100e0010000dc03034e640a3f2c2738f09c9418bd78edccd7559d0531199276d4d92a0e9ee9d77d0920a80c"
    "165581a8e0d06c0018d54d3a06dd32cfd4051eb026fad3fd0ba99269e6ef00061301130313020100008d0000000b"
    "0009000006736572766572ff01000100000a00140012001d00170018001901000101010201030104003300260024"
    "001d00208e7292cf3056dbb0d25fcbe55c107dc9bbf83dd9708f39203ba341249a7d9b63002b0003020304000d00"
    "20001e040305030603020308040805080604010501060102010402050206020202002d00020101001c00024001"
)
RECORD_SERVER_HELLO = H(
    "160303007a020000760303e5dd5948c435f7a38f0f0130708dc322d9df09abd4838117c183a7bb6d994f2c20a80c"
    "165581a8e0d06c0018d54d3a06dd32cfd4051eb026fad3fd0ba99269e6ef130100002e00330024001d00203e30f0"
    "f4ba551afd62768341175f5265e4daf0c8841617aa4fafdd2142320c22002b00020304"
)
RECORD_SERVER_FLIGHT = H(
    "14030300010117030302a248de891d9c3624a67a6c6f0601ab7ac20c1f6a9e14d2e6007e999e130367a8af1bcfea"
    "9498fbce19df4505eece3a25da523cbe55ea1b3bda4e91995e455d500a4faa6227b7111e1c8547e2d7c179db2153"
    "03d25827f3cd18f48f6491328cf5c0f814d388150bd9e9264aae491db6995069bea17665d5e0c817284d4ac21880"
    "054c3657331e23a9304dc88a15c04ec80bd3852bf7f9d3c6615b15fac83bbca031c6d2310d9f5d7a4b020a4f7c19"
    "062b65c05a1d3264b557ec9d8e0f7cee27e36f793039de8dd96edfca9009e0651034bff31d7f349eece01d99fcb5"
    "fcab840d7707c72299c3b5d04564e880a33c5e846c762e3d922bb55303d1d87cc0f06573f17dcb9b8ffd35bbd883"
    "c1cb3aa24fcc325005f768ce2fb624ca97b6c4d98e17f35bc2c7940a06100c2d448db7180b2d862164435c9c210e"
    "9860394e05aab23ff1b0203f662c588da5bc4411477a30b41136c488a0a63fcab5c15ac613226dae827a1d1fe95e"
    "ce6b30bcee1560a8d408d264555e760f9bfc624c2c87fd0456c9bfb41bcd1a7b212786d2b67fd57804facfa1eef7"
    "cf2919d8b998c9789f763b4d9caa093a9ded43175d46a76b4d54f0ce0c5d2259b607e30a9d241263874fa59d6f57"
    "0dc40d83a2d83bf9e9850d454c57806535a8998ae0357df92f00b9667344c24114ccc9ef539124b204e7e6e748c3"
    "0a28a3d1d183997243eaccbbd33b0c1115a0327106a1e6a75271d4983086f632ff0eb8b4c63102cbcef5bb72dae1"
    "279d5de8eb19096d8cdb07fa8ea989788fac23e66e0488c193f3f3fea8c8838896bf3ae4b6848d42ced4bdf41abe"
    "6fc331b44225e7a1f7d3564147d5458e71aa909cb02be958bbc42e3aa5a27cc6eaf4b6fe51ae4495694d8ab6320a"
    "ab920183fd5b31a359042fbd67391ec5e4d1892a2e5210141a494e9301b24a113c474c7f2a73457847"
)
RECORD_CLIENT_FINISHED = H(
    "140303000101170303003532d030e273773a8696c799981af6ced07f87482e81565e394e87c867f33df3d65b7506"
    "f1a626af91d4821d5f7a1f210ef8dd3c6d16"
)
RECORD_CLIENT_CLOSE_NOTIFY = H("17030300130f629155382dba23c4e2c5f7f84e6f2ed3083d")
RECORD_SERVER_CLOSE_NOTIFY = H("1703030013b7257b0fecaf69d4f09e3f891e2a25d1e28845")


def test_client_engine_reproduces_rfc8448_compatibility_mode_byte_for_byte() -> None:
    config = TLSConfig(rng=lambda n: b"", verify_peer=False, middlebox_compatibility=True)
    client = ClientConnection.__new__(ClientConnection)
    Connection.__init__(client, config, NOW)
    share = ClientKeyShare(NamedGroup.x25519, lambda n: CLIENT_X25519_PRIVATE)
    hello = pull_client_hello(RECORD_CLIENT_HELLO[9:])
    assert len(hello.legacy_session_id) == 32
    client._start(hello, [share], "server")
    assert client.data_to_send() == RECORD_CLIENT_HELLO
    client.receive_data(RECORD_SERVER_HELLO)
    client.receive_data(RECORD_SERVER_FLIGHT)  # begins with the server's dummy CCS
    assert client.data_to_send() == RECORD_CLIENT_FINISHED  # our CCS, then Finished
    assert client.handshake_complete
    client.receive_data(RECORD_SERVER_CLOSE_NOTIFY)
    assert list(client.events())[-1] == ConnectionClosed(clean=True)
    client.close()
    assert client.data_to_send() == RECORD_CLIENT_CLOSE_NOTIFY
