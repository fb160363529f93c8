"""The three TLS 1.3 cipher suites (RFC 8446 §B.4) and their AEAD/hash parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305


class CipherSuite(IntEnum):
    AES_128_GCM_SHA256 = 0x1301
    AES_256_GCM_SHA384 = 0x1302
    CHACHA20_POLY1305_SHA256 = 0x1303


AEAD = AESGCM | ChaCha20Poly1305


@dataclass(frozen=True, slots=True)
class SuiteParams:
    suite: CipherSuite
    hash_name: str
    hash_len: int
    key_len: int
    aead: Callable[[bytes], AEAD]
    # RFC 8446 §5.5: records per key before rekeying. AES-GCM: 2^24.5 full-size
    # records; we rekey well before, at 2^23. ChaCha20-Poly1305 has no practical limit.
    record_limit: int

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        return hashes.SHA384() if self.hash_name == "sha384" else hashes.SHA256()


IV_LENGTH = 12
TAG_LENGTH = 16

SUITES: dict[int, SuiteParams] = {
    CipherSuite.AES_128_GCM_SHA256: SuiteParams(
        CipherSuite.AES_128_GCM_SHA256, "sha256", 32, 16, AESGCM, 1 << 23
    ),
    CipherSuite.AES_256_GCM_SHA384: SuiteParams(
        CipherSuite.AES_256_GCM_SHA384, "sha384", 48, 32, AESGCM, 1 << 23
    ),
    CipherSuite.CHACHA20_POLY1305_SHA256: SuiteParams(
        CipherSuite.CHACHA20_POLY1305_SHA256, "sha256", 32, 32, ChaCha20Poly1305, 1 << 60
    ),
}

DEFAULT_CIPHER_SUITES: tuple[CipherSuite, ...] = (
    CipherSuite.AES_128_GCM_SHA256,
    CipherSuite.AES_256_GCM_SHA384,
    CipherSuite.CHACHA20_POLY1305_SHA256,
)
