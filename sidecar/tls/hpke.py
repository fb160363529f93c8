"""HPKE base mode (RFC 9180) composed on `cryptography`'s primitives.

`cryptography.hazmat.primitives.hpke` is single-shot: no associated data, no exporter,
no context that seals a second message. Encrypted ClientHello needs all three: the
ClientHelloOuter is the AAD of the sealed ClientHelloInner (RFC 9849 §5.2), and the
ClientHello answering a HelloRetryRequest is sealed with sequence number 1 of the
first context (§6.1.5). So the protocol of RFC 9180 §4-§5 is written here, and every
primitive (X25519, HKDF, AES-GCM, ChaCha20-Poly1305) is `cryptography`'s.

Only mode_base (§5.1.1) and DHKEM(X25519, HKDF-SHA256) with HKDF-SHA256: the suite ECH
deployments and Go's crypto/tls use. AEADs: AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

__all__ = [
    "AeadId",
    "Context",
    "HpkeError",
    "KdfId",
    "KemId",
    "derive_key_pair",
    "setup_base_r",
    "setup_base_s",
]

_MODE_BASE = 0x00
_VERSION = b"HPKE-v1"
_SHA256 = hashes.SHA256()
_NH = 32  # HKDF-SHA256 output length
_NSECRET = 32  # DHKEM(X25519, HKDF-SHA256) shared secret length (§7.1)
_NPK = 32  # X25519 public key and enc length


class KemId(IntEnum):
    DHKEM_X25519_HKDF_SHA256 = 0x0020


class KdfId(IntEnum):
    HKDF_SHA256 = 0x0001


class AeadId(IntEnum):
    AES_128_GCM = 0x0001
    AES_256_GCM = 0x0002
    CHACHA20_POLY1305 = 0x0003


# RFC 9180 §7.3: Nk (key length) per AEAD; Nn is 12 and Nt 16 for all three.
_NK = {AeadId.AES_128_GCM: 16, AeadId.AES_256_GCM: 32, AeadId.CHACHA20_POLY1305: 32}
_NN = 12


class HpkeError(Exception):
    """Opening failed (wrong key, altered ciphertext or AAD), or an input is unusable."""


def _i2osp(value: int, length: int) -> bytes:
    return value.to_bytes(length, "big")


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    # RFC 9180 §4: LabeledExtract; an empty salt is HMAC's all-zero key (RFC 5869 §2.2).
    return HKDF.extract(_SHA256, salt or bytes(_NH), _VERSION + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled_info = _i2osp(length, 2) + _VERSION + suite_id + label + info
    return HKDFExpand(_SHA256, length, labeled_info).derive(prk)


_KEM_SUITE_ID = b"KEM" + _i2osp(KemId.DHKEM_X25519_HKDF_SHA256, 2)


def _extract_and_expand(dh: bytes, kem_context: bytes) -> bytes:
    # RFC 9180 §4.1: ExtractAndExpand.
    eae_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE_ID, eae_prk, b"shared_secret", kem_context, _NSECRET)


def derive_key_pair(ikm: bytes) -> X25519PrivateKey:
    """RFC 9180 §7.1.3: DeriveKeyPair for X25519 (test vectors fix the ephemeral key)."""
    dkp_prk = _labeled_extract(_KEM_SUITE_ID, b"", b"dkp_prk", ikm)
    sk = _labeled_expand(_KEM_SUITE_ID, dkp_prk, b"sk", b"", 32)
    return X25519PrivateKey.from_private_bytes(sk)


def _public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes_raw()


def _encap(pk_r: X25519PublicKey, sk_e: X25519PrivateKey) -> tuple[bytes, bytes]:
    """RFC 9180 §4.1: Encap; returns (shared_secret, enc)."""
    try:
        dh = sk_e.exchange(pk_r)
    except ValueError as exc:  # an all-zero result: a small-order public key (§7.1.4)
        raise HpkeError("recipient key of small order") from exc
    enc = _public_bytes(sk_e.public_key())
    return _extract_and_expand(dh, enc + _public_bytes(pk_r)), enc


def _decap(enc: bytes, sk_r: X25519PrivateKey) -> bytes:
    if len(enc) != _NPK:
        raise HpkeError(f"enc of {len(enc)} bytes, not {_NPK}")
    try:
        dh = sk_r.exchange(X25519PublicKey.from_public_bytes(enc))
    except ValueError as exc:
        raise HpkeError("enc is a small-order point") from exc
    return _extract_and_expand(dh, enc + _public_bytes(sk_r.public_key()))


_Aead = AESGCM | ChaCha20Poly1305


@dataclass(slots=True)
class Context:
    """An HPKE encryption context (RFC 9180 §5.2): one direction, sequence-numbered."""

    aead_id: AeadId
    key: bytes
    base_nonce: bytes
    exporter_secret: bytes
    suite_id: bytes
    seq: int = 0

    def _cipher(self) -> _Aead:
        if self.aead_id == AeadId.CHACHA20_POLY1305:
            return ChaCha20Poly1305(self.key)
        return AESGCM(self.key)

    def _nonce(self) -> bytes:
        # RFC 9180 §5.2: ComputeNonce(seq) = base_nonce XOR I2OSP(seq, Nn).
        seq = _i2osp(self.seq, _NN)
        return bytes(a ^ b for a, b in zip(self.base_nonce, seq, strict=True))

    def _advance(self) -> None:
        if self.seq >= (1 << (8 * _NN)) - 1:
            raise HpkeError("message limit reached")  # §5.2: MessageLimitReachedError
        self.seq += 1

    def seal(self, aad: bytes, plaintext: bytes) -> bytes:
        ciphertext = self._cipher().encrypt(self._nonce(), plaintext, aad)
        self._advance()
        return ciphertext

    def open(self, aad: bytes, ciphertext: bytes) -> bytes:
        try:
            plaintext = self._cipher().decrypt(self._nonce(), ciphertext, aad)
        except InvalidTag as exc:
            raise HpkeError("open failed") from exc
        # §5.2: the sequence number advances only on success.
        self._advance()
        return plaintext

    def export(self, exporter_context: bytes, length: int) -> bytes:
        """RFC 9180 §5.3: the secret exporter."""
        if length > 255 * _NH:
            raise HpkeError("export length too large")
        return _labeled_expand(
            self.suite_id, self.exporter_secret, b"sec", exporter_context, length
        )


@lru_cache(maxsize=64)
def _key_schedule_context(suite_id: bytes, info: bytes) -> bytes:
    """mode || psk_id_hash || info_hash: fixed per suite and info (an ECHConfig's), so
    computed once, not per handshake."""
    psk_id_hash = _labeled_extract(suite_id, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(suite_id, b"", b"info_hash", info)
    return bytes((_MODE_BASE,)) + psk_id_hash + info_hash


def _key_schedule(aead_id: AeadId, shared_secret: bytes, info: bytes) -> Context:
    """RFC 9180 §5.1 KeySchedule for mode_base (empty psk and psk_id)."""
    suite_id = (
        b"HPKE"
        + _i2osp(KemId.DHKEM_X25519_HKDF_SHA256, 2)
        + _i2osp(KdfId.HKDF_SHA256, 2)
        + _i2osp(aead_id, 2)
    )
    context = _key_schedule_context(suite_id, info)
    secret = _labeled_extract(suite_id, shared_secret, b"secret", b"")
    key = _labeled_expand(suite_id, secret, b"key", context, _NK[aead_id])
    base_nonce = _labeled_expand(suite_id, secret, b"base_nonce", context, _NN)
    exporter = _labeled_expand(suite_id, secret, b"exp", context, _NH)
    return Context(aead_id, key, base_nonce, exporter, suite_id)


def _aead(aead_id: int) -> AeadId:
    try:
        return AeadId(aead_id)
    except ValueError as exc:
        raise HpkeError(f"unsupported AEAD 0x{aead_id:04x}") from exc


def setup_base_s(
    pk_r: bytes,
    info: bytes,
    aead_id: int,
    rng: Callable[[int], bytes],
    *,
    ephemeral: X25519PrivateKey | None = None,
) -> tuple[bytes, Context]:
    """RFC 9180 §5.1.1 SetupBaseS: (enc, sender context). The ephemeral key comes from
    `rng` (the engine's only randomness), or `ephemeral` for test vectors."""
    if len(pk_r) != _NPK:
        raise HpkeError(f"recipient key of {len(pk_r)} bytes, not {_NPK}")
    # RFC 9180 §7.1.3: an X25519 private key is any 32 random bytes (clamped by X25519).
    sk_e = ephemeral if ephemeral is not None else X25519PrivateKey.from_private_bytes(rng(32))
    shared, enc = _encap(X25519PublicKey.from_public_bytes(pk_r), sk_e)
    return enc, _key_schedule(_aead(aead_id), shared, info)


def setup_base_r(enc: bytes, sk_r: X25519PrivateKey, info: bytes, aead_id: int) -> Context:
    """RFC 9180 §5.1.1 SetupBaseR: the recipient context."""
    return _key_schedule(_aead(aead_id), _decap(enc, sk_r), info)
