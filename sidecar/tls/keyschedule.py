"""The TLS 1.3 key schedule (RFC 8446 §7.1), one type per stage.

    0 -> HKDF-Extract(salt=0, IKM=PSK or 0)  = EarlySecret     (binder, early traffic)
      -> Derive-Secret(., "derived", "")
      -> HKDF-Extract(., IKM=(EC)DHE)       = HandshakeSecret  (handshake traffic)
      -> Derive-Secret(., "derived", "")
      -> HKDF-Extract(., IKM=0)             = MasterSecret     (application traffic,
                                                                exporter, resumption)

`EarlySecret` already takes an optional PSK and offers `binder_key` and
`client_early_traffic_secret`, so session resumption and 0-RTT plug in without
changing the later stages. `resumption_psk` derives a ticket's PSK (§4.6.1).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from .suites import IV_LENGTH, SuiteParams

_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384()}


def hkdf_extract(params: SuiteParams, salt: bytes, ikm: bytes) -> bytes:
    return HKDF.extract(_HASHES[params.hash_name], salt, ikm)


def _hkdf_label(label: bytes, context: bytes, length: int) -> bytes:
    """RFC 8446 §7.1 HkdfLabel = uint16 length || "tls13 " + label || context."""
    full_label = b"tls13 " + label
    return b"".join(
        (
            length.to_bytes(2, "big"),
            bytes((len(full_label),)),
            full_label,
            bytes((len(context),)),
            context,
        )
    )


# Labels with an empty context (key, iv, finished, traffic upd, ...) recur every handshake.
_constant_label = lru_cache(maxsize=64)(_hkdf_label)


def hkdf_expand_label(
    params: SuiteParams, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    info = _hkdf_label(label, context, length) if context else _constant_label(label, b"", length)
    return HKDFExpand(_HASHES[params.hash_name], length, info).derive(secret)


def derive_secret(
    params: SuiteParams, secret: bytes, label: bytes, transcript_hash: bytes
) -> bytes:
    return hkdf_expand_label(params, secret, label, transcript_hash, params.hash_len)


def empty_hash(params: SuiteParams) -> bytes:
    return hashlib.new(params.hash_name).digest()


@dataclass(frozen=True, slots=True)
class TrafficKeys:
    """A traffic secret and the AEAD key and IV derived from it (§7.3)."""

    secret: bytes
    key: bytes
    iv: bytes


def traffic_keys(params: SuiteParams, secret: bytes) -> TrafficKeys:
    return TrafficKeys(
        secret,
        hkdf_expand_label(params, secret, b"key", b"", params.key_len),
        hkdf_expand_label(params, secret, b"iv", b"", IV_LENGTH),
    )


def next_traffic_secret(params: SuiteParams, secret: bytes) -> bytes:
    """RFC 8446 §7.2: application_traffic_secret_N+1."""
    return hkdf_expand_label(params, secret, b"traffic upd", b"", params.hash_len)


def finished_key(params: SuiteParams, base_key: bytes) -> bytes:
    return hkdf_expand_label(params, base_key, b"finished", b"", params.hash_len)


def finished_verify_data(params: SuiteParams, base_key: bytes, transcript_hash: bytes) -> bytes:
    """RFC 8446 §4.4.4: HMAC(finished_key, Transcript-Hash(...))."""
    return hmac.digest(finished_key(params, base_key), transcript_hash, params.hash_name)


def resumption_psk(params: SuiteParams, resumption_master_secret: bytes, nonce: bytes) -> bytes:
    """RFC 8446 §4.6.1: the PSK a NewSessionTicket stands for."""
    return hkdf_expand_label(
        params, resumption_master_secret, b"resumption", nonce, params.hash_len
    )


@dataclass(frozen=True, slots=True)
class EarlySecret:
    params: SuiteParams
    secret: bytes

    @classmethod
    def start(cls, params: SuiteParams, psk: bytes | None = None) -> EarlySecret:
        ikm = psk if psk is not None else bytes(params.hash_len)
        return cls(params, hkdf_extract(params, bytes(params.hash_len), ikm))

    def binder_key(self, resumption: bool = True) -> bytes:
        label = b"res binder" if resumption else b"ext binder"
        return derive_secret(self.params, self.secret, label, empty_hash(self.params))

    def client_early_traffic_secret(self, transcript_hash: bytes) -> bytes:
        return derive_secret(self.params, self.secret, b"c e traffic", transcript_hash)

    def early_exporter_master_secret(self, transcript_hash: bytes) -> bytes:
        return derive_secret(self.params, self.secret, b"e exp master", transcript_hash)

    def handshake(self, shared_secret: bytes) -> HandshakeSecret:
        salt = derive_secret(self.params, self.secret, b"derived", empty_hash(self.params))
        return HandshakeSecret(self.params, hkdf_extract(self.params, salt, shared_secret))


@dataclass(frozen=True, slots=True)
class HandshakeSecret:
    params: SuiteParams
    secret: bytes

    def client_traffic_secret(self, transcript_hash: bytes) -> bytes:
        return derive_secret(self.params, self.secret, b"c hs traffic", transcript_hash)

    def server_traffic_secret(self, transcript_hash: bytes) -> bytes:
        return derive_secret(self.params, self.secret, b"s hs traffic", transcript_hash)

    def master(self) -> MasterSecret:
        salt = derive_secret(self.params, self.secret, b"derived", empty_hash(self.params))
        return MasterSecret(
            self.params, hkdf_extract(self.params, salt, bytes(self.params.hash_len))
        )


@dataclass(frozen=True, slots=True)
class MasterSecret:
    params: SuiteParams
    secret: bytes

    def client_application_traffic_secret(self, transcript_hash: bytes) -> bytes:
        return derive_secret(self.params, self.secret, b"c ap traffic", transcript_hash)

    def server_application_traffic_secret(self, transcript_hash: bytes) -> bytes:
        return derive_secret(self.params, self.secret, b"s ap traffic", transcript_hash)

    def exporter_master_secret(self, transcript_hash: bytes) -> bytes:
        return derive_secret(self.params, self.secret, b"exp master", transcript_hash)

    def resumption_master_secret(self, transcript_hash: bytes) -> bytes:
        return derive_secret(self.params, self.secret, b"res master", transcript_hash)


class Transcript:
    """The running transcript hash (§4.4.1), buffering until the suite is known."""

    __slots__ = ("_hash", "_pending")

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._hash: hashlib._Hash | None = None

    def update(self, message: bytes) -> None:
        if self._hash is None:
            self._pending.append(message)
        else:
            self._hash.update(message)

    def select_hash(self, hash_name: str) -> None:
        if self._hash is None:
            self._hash = hashlib.new(hash_name)
            for message in self._pending:
                self._hash.update(message)
            self._pending.clear()

    def restart_after_retry(self, hash_name: str, client_hello1: bytes) -> None:
        """RFC 8446 §4.4.1: replace ClientHello1 with message_hash(Hash(ClientHello1))."""
        from .messages import message_hash

        self._pending.clear()
        self._hash = hashlib.new(hash_name)
        self._hash.update(message_hash(hash_name, client_hello1))

    def digest(self) -> bytes:
        assert self._hash is not None, "transcript hash selected before use"
        return self._hash.copy().digest()

    def digest_with(self, hash_name: str, message: bytes) -> bytes:
        """Hash(transcript so far || message), leaving the transcript as it is: a PSK
        binder covers the transcript up to the truncated ClientHello (RFC 8446 §4.2.11.2)."""
        if self._hash is None:
            h = hashlib.new(hash_name)
            for pending in self._pending:
                h.update(pending)
        else:
            h = self._hash.copy()
        h.update(message)
        return h.digest()
