"""Handshake messages (RFC 8446 §4): one frozen dataclass and a pull/push pair each.

`pull_*` take the message *body* (without the 4-byte handshake header) and raise
`TLSError(decode_error)` on malformed input; `push_*` return the whole handshake
message including its header, which is what the transcript hashes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum

from .alerts import AlertDescription, TLSError
from .codec import Buffer, Writer
from .extensions import RawExtension, pull_extensions, push_extensions

TLS12 = 0x0303
TLS13 = 0x0304

# RFC 8446 §4.1.3: a HelloRetryRequest is a ServerHello with this random.
HELLO_RETRY_REQUEST_RANDOM = hashlib.sha256(b"HelloRetryRequest").digest()
# RFC 8446 §4.1.3: downgrade sentinels in the last 8 bytes of ServerHello.random.
DOWNGRADE_TLS12 = b"DOWNGRD\x01"
DOWNGRADE_TLS11 = b"DOWNGRD\x00"


class HandshakeType(IntEnum):
    client_hello = 1
    server_hello = 2
    new_session_ticket = 4
    end_of_early_data = 5
    encrypted_extensions = 8
    certificate = 11
    certificate_request = 13
    certificate_verify = 15
    finished = 20
    key_update = 24
    message_hash = 254


def frame(msg_type: int, body: bytes) -> bytes:
    """Prefix a handshake body with its type and uint24 length."""
    return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body


@dataclass(frozen=True, slots=True)
class ClientHello:
    random: bytes
    legacy_session_id: bytes
    cipher_suites: tuple[int, ...]
    legacy_compression_methods: bytes
    extensions: tuple[RawExtension, ...]
    legacy_version: int = TLS12


def pull_client_hello(body: bytes) -> ClientHello:
    buf = Buffer(body)
    legacy_version = buf.pull_uint16()
    random = buf.pull_bytes(32)
    session_id = buf.pull_vector(1, maximum=32)
    suites_raw = buf.pull_vector(2, minimum=2)
    if len(suites_raw) % 2:
        raise TLSError(AlertDescription.decode_error, "odd cipher_suites length")
    suites = tuple(
        int.from_bytes(suites_raw[i : i + 2], "big") for i in range(0, len(suites_raw), 2)
    )
    compression = buf.pull_vector(1, minimum=1)
    extensions = pull_extensions(buf) if not buf.eof() else ()
    buf.expect_end()
    return ClientHello(random, session_id, suites, compression, extensions, legacy_version)


def push_client_hello(msg: ClientHello) -> bytes:
    w = Writer()
    w.push_uint16(msg.legacy_version)
    w.push_bytes(msg.random)
    w.push_vector(1, msg.legacy_session_id)
    w.push_vector(2, b"".join(s.to_bytes(2, "big") for s in msg.cipher_suites))
    w.push_vector(1, msg.legacy_compression_methods)
    push_extensions(w, msg.extensions)
    return frame(HandshakeType.client_hello, w.data())


@dataclass(frozen=True, slots=True)
class ServerHello:
    """ServerHello or, when `random` is the magic value, HelloRetryRequest."""

    random: bytes
    legacy_session_id_echo: bytes
    cipher_suite: int
    extensions: tuple[RawExtension, ...]
    legacy_version: int = TLS12
    legacy_compression_method: int = 0

    @property
    def is_hello_retry_request(self) -> bool:
        return self.random == HELLO_RETRY_REQUEST_RANDOM


def pull_server_hello(body: bytes) -> ServerHello:
    buf = Buffer(body)
    legacy_version = buf.pull_uint16()
    random = buf.pull_bytes(32)
    session_id = buf.pull_vector(1, maximum=32)
    suite = buf.pull_uint16()
    compression = buf.pull_uint8()
    extensions = pull_extensions(buf) if not buf.eof() else ()
    buf.expect_end()
    return ServerHello(random, session_id, suite, extensions, legacy_version, compression)


def push_server_hello(msg: ServerHello) -> bytes:
    w = Writer()
    w.push_uint16(msg.legacy_version)
    w.push_bytes(msg.random)
    w.push_vector(1, msg.legacy_session_id_echo)
    w.push_uint16(msg.cipher_suite)
    w.push_uint8(msg.legacy_compression_method)
    push_extensions(w, msg.extensions)
    return frame(HandshakeType.server_hello, w.data())


@dataclass(frozen=True, slots=True)
class EncryptedExtensions:
    extensions: tuple[RawExtension, ...]


def pull_encrypted_extensions(body: bytes) -> EncryptedExtensions:
    buf = Buffer(body)
    extensions = pull_extensions(buf)
    buf.expect_end()
    return EncryptedExtensions(extensions)


def push_encrypted_extensions(msg: EncryptedExtensions) -> bytes:
    w = Writer()
    push_extensions(w, msg.extensions)
    return frame(HandshakeType.encrypted_extensions, w.data())


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    request_context: bytes
    extensions: tuple[RawExtension, ...]


def pull_certificate_request(body: bytes) -> CertificateRequest:
    buf = Buffer(body)
    context = buf.pull_vector(1)
    extensions = pull_extensions(buf)
    buf.expect_end()
    return CertificateRequest(context, extensions)


def push_certificate_request(msg: CertificateRequest) -> bytes:
    w = Writer()
    w.push_vector(1, msg.request_context)
    push_extensions(w, msg.extensions)
    return frame(HandshakeType.certificate_request, w.data())


@dataclass(frozen=True, slots=True)
class CertificateEntry:
    cert_data: bytes
    extensions: tuple[RawExtension, ...] = ()


@dataclass(frozen=True, slots=True)
class Certificate:
    request_context: bytes
    entries: tuple[CertificateEntry, ...]


def pull_certificate(body: bytes) -> Certificate:
    buf = Buffer(body)
    context = buf.pull_vector(1)
    entries: list[CertificateEntry] = []
    with buf.pull_block(3):
        while not buf.eof():
            cert = buf.pull_vector(3, minimum=1)
            entries.append(CertificateEntry(cert, pull_extensions(buf)))
    buf.expect_end()
    return Certificate(context, tuple(entries))


def push_certificate(msg: Certificate) -> bytes:
    w = Writer()
    w.push_vector(1, msg.request_context)
    with w.push_block(3):
        for entry in msg.entries:
            w.push_vector(3, entry.cert_data)
            push_extensions(w, entry.extensions)
    return frame(HandshakeType.certificate, w.data())


@dataclass(frozen=True, slots=True)
class CertificateVerify:
    algorithm: int
    signature: bytes


def pull_certificate_verify(body: bytes) -> CertificateVerify:
    buf = Buffer(body)
    algorithm = buf.pull_uint16()
    signature = buf.pull_vector(2, minimum=1)
    buf.expect_end()
    return CertificateVerify(algorithm, signature)


def push_certificate_verify(msg: CertificateVerify) -> bytes:
    w = Writer()
    w.push_uint16(msg.algorithm)
    w.push_vector(2, msg.signature)
    return frame(HandshakeType.certificate_verify, w.data())


@dataclass(frozen=True, slots=True)
class Finished:
    verify_data: bytes


def pull_finished(body: bytes, hash_length: int) -> Finished:
    """RFC 8446 §4.4.4: verify_data is exactly Hash.length bytes. A body of any other
    length cannot be parsed, which §6.2 makes decode_error, not a MAC mismatch."""
    if len(body) != hash_length:
        raise TLSError(
            AlertDescription.decode_error,
            f"Finished of {len(body)} bytes, not the hash's {hash_length}",
        )
    return Finished(bytes(body))


def push_finished(msg: Finished) -> bytes:
    return frame(HandshakeType.finished, msg.verify_data)


@dataclass(frozen=True, slots=True)
class NewSessionTicket:
    ticket_lifetime: int
    ticket_age_add: int
    ticket_nonce: bytes
    ticket: bytes
    extensions: tuple[RawExtension, ...]


MAX_TICKET_LIFETIME = 604800  # RFC 8446 §4.6.1: seven days


def pull_new_session_ticket(body: bytes) -> NewSessionTicket:
    buf = Buffer(body)
    lifetime = buf.pull_uint32()
    age_add = buf.pull_uint32()
    nonce = buf.pull_vector(1)
    ticket = buf.pull_vector(2, minimum=1)
    extensions = pull_extensions(buf)
    buf.expect_end()
    if lifetime > MAX_TICKET_LIFETIME:
        # RFC 8446 §4.6.1: "Servers MUST NOT use any value greater than 604800 seconds."
        raise TLSError(AlertDescription.illegal_parameter, "ticket lifetime over 7 days")
    return NewSessionTicket(lifetime, age_add, nonce, ticket, extensions)


def push_new_session_ticket(msg: NewSessionTicket) -> bytes:
    w = Writer()
    w.push_uint32(msg.ticket_lifetime)
    w.push_uint32(msg.ticket_age_add)
    w.push_vector(1, msg.ticket_nonce)
    w.push_vector(2, msg.ticket)
    push_extensions(w, msg.extensions)
    return frame(HandshakeType.new_session_ticket, w.data())


class KeyUpdateRequest(IntEnum):
    update_not_requested = 0
    update_requested = 1


@dataclass(frozen=True, slots=True)
class KeyUpdate:
    request_update: KeyUpdateRequest


def pull_key_update(body: bytes) -> KeyUpdate:
    buf = Buffer(body)
    value = buf.pull_uint8()
    buf.expect_end()
    if value not in (0, 1):
        # RFC 8446 §4.6.3: any other value is illegal_parameter.
        raise TLSError(AlertDescription.illegal_parameter, "bad KeyUpdateRequest")
    return KeyUpdate(KeyUpdateRequest(value))


def push_key_update(msg: KeyUpdate) -> bytes:
    return frame(HandshakeType.key_update, bytes((msg.request_update,)))


def message_hash(hash_name: str, client_hello1: bytes) -> bytes:
    """RFC 8446 §4.4.1: the synthetic message replacing ClientHello1 after an HRR."""
    return frame(HandshakeType.message_hash, hashlib.new(hash_name, client_hello1).digest())
