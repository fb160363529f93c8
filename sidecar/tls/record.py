"""The TLS 1.3 record layer (RFC 8446 §5): framing, AEAD protection, padding.

`RecordProtection` holds one direction's key: the AEAD object is built once per key
and the per-record nonce is the IV XOR the 64-bit sequence number (§5.3).
`RecordReader` splits the inbound byte stream into records and applies the length
and content-type rules, and charges each record against the budget a peer has before
it authenticated (`limits.py`); the connection decides what each content type means.
"""

from __future__ import annotations

from enum import IntEnum

from cryptography.exceptions import InvalidTag

from .alerts import AlertDescription, TLSError
from .keyschedule import TrafficKeys
from .limits import PRE_AUTH_BYTES
from .suites import IV_LENGTH, TAG_LENGTH, SuiteParams


class ContentType(IntEnum):
    invalid = 0
    change_cipher_spec = 20
    alert = 21
    handshake = 22
    application_data = 23


MAX_PLAINTEXT = 1 << 14
# RFC 8446 §5.4: "The length (in bytes) of TLSInnerPlaintext MUST NOT exceed 2^14 + 1."
MAX_INNER_PLAINTEXT = MAX_PLAINTEXT + 1
# RFC 8446 §5.2: TLSCiphertext.length MUST NOT exceed 2^14 + 256.
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256
MAX_SEQUENCE = (1 << 64) - 1
HEADER_LENGTH = 5
_VALID_TYPES = frozenset(int(t) for t in ContentType if t != ContentType.invalid)
_TYPE_BYTE = {t: bytes((t,)) for t in range(256)}
# The header of a full-size application-data record, precomputed for the hot path.
_HEADERS = {
    MAX_PLAINTEXT + 1: b"\x17\x03\x03" + (MAX_PLAINTEXT + 1 + TAG_LENGTH).to_bytes(2, "big")
}


class RecordProtection:
    """AEAD state for one direction under one traffic secret."""

    __slots__ = ("_aead", "_iv", "iv", "key", "params", "secret", "seq")

    def __init__(self, params: SuiteParams, keys: TrafficKeys) -> None:
        self.params = params
        self.secret = keys.secret
        self.key = keys.key
        self.iv = keys.iv
        self._iv = int.from_bytes(keys.iv, "big")
        self._aead = params.aead(keys.key)
        self.seq = 0

    def _next_nonce(self) -> bytes:
        seq = self.seq
        if seq > MAX_SEQUENCE:
            # RFC 8446 §5.3: the sequence number MUST NOT wrap.
            raise TLSError(AlertDescription.internal_error, "record sequence number exhausted")
        self.seq = seq + 1
        return (self._iv ^ seq).to_bytes(IV_LENGTH, "big")

    def seal(self, content_type: int, fragment: bytes | memoryview, padding: int = 0) -> bytes:
        """One TLSCiphertext record carrying `fragment` (at most 2^14 bytes)."""
        return b"".join(self.seal_parts(content_type, fragment, padding))

    def seal_parts(
        self, content_type: int, fragment: bytes | memoryview, padding: int = 0
    ) -> tuple[bytes, bytes]:
        """(header, ciphertext) of one record; the caller joins them once, with others."""
        return self.seal_pieces(content_type, [fragment], len(fragment), padding)

    def seal_pieces(
        self,
        content_type: int,
        pieces: list[bytes | memoryview],
        length: int,
        padding: int = 0,
    ) -> tuple[bytes, bytes]:
        """`seal_parts` for a fragment given as pieces totalling `length` bytes: the inner
        plaintext is assembled in the one join the AEAD needs anyway."""
        # RFC 8446 §5.2: TLSInnerPlaintext = content || ContentType || zeros.
        pieces.append(_TYPE_BYTE[content_type])
        if padding:
            pieces.append(bytes(padding))
        inner = b"".join(pieces)
        size = length + 1 + padding
        header = _HEADERS.get(size) or b"\x17\x03\x03" + (size + TAG_LENGTH).to_bytes(2, "big")
        return header, self._aead.encrypt(self._next_nonce(), inner, header)

    def open(self, header: bytes, payload: bytes | memoryview) -> tuple[int, bytes]:
        if self.seq > MAX_SEQUENCE:
            raise TLSError(AlertDescription.unexpected_message, "peer exhausted sequence numbers")
        nonce = self._next_nonce()
        try:
            inner = self._aead.decrypt(nonce, payload, header)
        except InvalidTag as exc:
            raise TLSError(AlertDescription.bad_record_mac, "record authentication failed") from exc
        if len(inner) > MAX_INNER_PLAINTEXT:
            # RFC 8446 §5.2, §5.4: the whole TLSInnerPlaintext (content, type byte and
            # padding) is at most 2^14 + 1 bytes, so padding alone can overflow a record.
            raise TLSError(AlertDescription.record_overflow, "inner plaintext over 2^14 + 1")
        # RFC 8446 §5.4: strip zero padding; the last non-zero byte is the real type.
        stripped = inner if inner and inner[-1] else inner.rstrip(b"\x00")
        if not stripped:
            raise TLSError(AlertDescription.unexpected_message, "record without content type")
        return stripped[-1], stripped[:-1]


_SKIPPED: tuple[int, bytes, bool] = (-1, b"", False)


def plaintext_record(content_type: int, fragment: bytes, legacy_version: int = 0x0303) -> bytes:
    return (
        bytes((content_type,))
        + legacy_version.to_bytes(2, "big")
        + len(fragment).to_bytes(2, "big")
        + fragment
    )


class RecordReader:
    """Splits the inbound stream into (content type, payload) with §5.1/§5.2 rules.

    Consumed bytes are dropped lazily (`compact`), so a burst of many records is not
    re-copied once per record.

    `pre_auth_budget` is what the peer may still send, in record bytes with headers,
    until the connection sets it to None once the handshake completed.
    """

    __slots__ = ("_buffer", "_pos", "pre_auth_budget", "protection", "skip_early")

    def __init__(self) -> None:
        self._buffer = b""
        self._pos = 0
        self.protection: RecordProtection | None = None
        self.pre_auth_budget: int | None = PRE_AUTH_BYTES
        # RFC 8446 §4.2.10: bytes of rejected early data a server may still skip.
        self.skip_early = 0

    def feed(self, data: bytes) -> None:
        if self._pos >= len(self._buffer):
            # Nothing left over: parse the caller's bytes in place, without a copy.
            self._buffer = data if type(data) is bytes else bytes(data)
        else:
            self._buffer = b"".join((memoryview(self._buffer)[self._pos :], data))
        self._pos = 0

    def compact(self) -> None:
        if self._pos >= len(self._buffer):
            self._buffer = b""
            self._pos = 0

    def buffered(self) -> int:
        return len(self._buffer) - self._pos

    def awaited(self) -> int:
        """Bytes still missing from the record begun in the buffer; 0 at a record
        boundary (where kernel TLS can take the stream over)."""
        held = len(self._buffer) - self._pos
        if held == 0:
            return 0
        if held < HEADER_LENGTH:
            return HEADER_LENGTH - held
        pos = self._pos
        length = (self._buffer[pos + 3] << 8) | self._buffer[pos + 4]
        return HEADER_LENGTH + length - held

    def next_record(self) -> tuple[int, bytes, bool] | None:
        """The next complete record as (content type, fragment, was_encrypted), or None."""
        while True:
            record = self._next_record()
            if record is not _SKIPPED:
                return record

    def _skip(self, length: int) -> None:
        if length > self.skip_early:
            # RFC 8446 §4.2.10: more than max_early_data_size is unexpected_message.
            raise TLSError(AlertDescription.unexpected_message, "too much rejected early data")
        self.skip_early -= length

    def _next_record(self) -> tuple[int, bytes, bool] | None:
        buf = self._buffer
        pos = self._pos
        if len(buf) - pos < HEADER_LENGTH:
            return None
        outer_type = buf[pos]
        length = (buf[pos + 3] << 8) | buf[pos + 4]
        if outer_type not in _VALID_TYPES:
            raise TLSError(AlertDescription.unexpected_message, f"unknown record type {outer_type}")
        limit = MAX_CIPHERTEXT if self.protection is not None else MAX_PLAINTEXT
        if length > limit:
            raise TLSError(AlertDescription.record_overflow, "record over the length limit")
        end = pos + HEADER_LENGTH + length
        budget = self.pre_auth_budget
        if budget is not None:
            # Refused at the header, before the record's bytes are even awaited.
            if HEADER_LENGTH + length > budget:
                raise TLSError(
                    AlertDescription.unexpected_message,
                    f"more than {PRE_AUTH_BYTES} bytes of records before the handshake completed",
                )
            if len(buf) < end:
                return None
            self.pre_auth_budget = budget - HEADER_LENGTH - length
        elif len(buf) < end:
            return None
        self._pos = end
        # RFC 8446 §5: change_cipher_spec is never encrypted, even after keys are set.
        if self.protection is None or outer_type == ContentType.change_cipher_spec:
            if self.skip_early and outer_type == ContentType.application_data:
                # 0-RTT records after a HelloRetryRequest: no key could open them.
                self._skip(length)
                return _SKIPPED
            return outer_type, bytes(buf[pos + HEADER_LENGTH : end]), False
        if outer_type == ContentType.alert and length == 2:
            # A peer that failed before it could install our keys (e.g. rejecting the
            # ServerHello) sends its alert in the clear; accept it so the real reason
            # surfaces instead of a generic unexpected_message.
            return outer_type, bytes(buf[pos + HEADER_LENGTH : end]), False
        if outer_type != ContentType.application_data:
            # RFC 8446 §5.2: protected records always carry opaque_type application_data.
            raise TLSError(AlertDescription.unexpected_message, "unprotected record after keys")
        view = memoryview(buf)
        protection = self.protection
        if self.skip_early:
            # Rejected 0-RTT records do not open under the handshake key; the first
            # record that does ends the skipping.
            seq = protection.seq
            try:
                content_type, fragment = protection.open(
                    buf[pos : pos + HEADER_LENGTH], view[pos + HEADER_LENGTH : end]
                )
            except TLSError:
                protection.seq = seq
                self._skip(length)
                return _SKIPPED
            self.skip_early = 0
            return content_type, fragment, True
        content_type, fragment = protection.open(
            buf[pos : pos + HEADER_LENGTH], view[pos + HEADER_LENGTH : end]
        )
        return content_type, fragment, True
