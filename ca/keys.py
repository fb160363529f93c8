"""Key algorithms Trellis generates and accepts, and how keys reach the disk.

Every key file is written 0600 through a temporary file in the same directory and an
atomic rename, so a crash or a bad passphrase never leaves a half-written key behind.
"""

from __future__ import annotations

import contextlib
import enum
import os
from pathlib import Path
from typing import TypeAlias

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa

__all__ = [
    "KeyAlgorithm",
    "KeyMaterialError",
    "PrivateKey",
    "PublicKey",
    "describe_public_key",
    "generate_private_key",
    "is_encrypted_pem",
    "load_private_key",
    "private_key_pem",
    "write_private_file",
    "write_public_file",
]

PrivateKey: TypeAlias = (
    ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | rsa.RSAPrivateKey
    | mldsa.MLDSA65PrivateKey
)
PublicKey: TypeAlias = (
    ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey | mldsa.MLDSA65PublicKey
)

MIN_RSA_BITS = 2048


class KeyMaterialError(ValueError):
    """A key is of a kind Trellis refuses, or cannot be loaded (e.g. wrong passphrase)."""


class KeyAlgorithm(enum.Enum):
    P256 = "p256"
    P384 = "p384"
    ED25519 = "ed25519"
    RSA2048 = "rsa2048"
    RSA3072 = "rsa3072"
    MLDSA65 = "mldsa65"

    @classmethod
    def parse(cls, text: str) -> KeyAlgorithm:
        normalised = text.strip().lower().replace("-", "").replace("_", "")
        aliases = {
            "ecdsap256": "p256",
            "ecdsap384": "p384",
            "secp256r1": "p256",
            "secp384r1": "p384",
        }
        normalised = aliases.get(normalised, normalised)
        for member in cls:
            if member.value == normalised:
                return member
        choices = ", ".join(m.value for m in cls)
        raise KeyMaterialError(f"unknown key algorithm {text!r} (choose one of: {choices})")


def generate_private_key(algorithm: KeyAlgorithm) -> PrivateKey:
    match algorithm:
        case KeyAlgorithm.P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyAlgorithm.P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyAlgorithm.ED25519:
            return ed25519.Ed25519PrivateKey.generate()
        case KeyAlgorithm.RSA2048:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        case KeyAlgorithm.RSA3072:
            return rsa.generate_private_key(public_exponent=65537, key_size=3072)
        case KeyAlgorithm.MLDSA65:
            return mldsa.MLDSA65PrivateKey.generate()


def check_public_key(key: object) -> PublicKey:
    """Accept the public-key kinds allowed in CSRs; refuse weak or unknown ones."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise KeyMaterialError(f"EC curve {key.curve.name} is not accepted (P-256 or P-384)")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyMaterialError(
                f"RSA key of {key.key_size} bits is too small (minimum {MIN_RSA_BITS})"
            )
        return key
    if isinstance(key, ed25519.Ed25519PublicKey | mldsa.MLDSA65PublicKey):
        return key
    raise KeyMaterialError(f"public key type {type(key).__name__} is not accepted")


def describe_public_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384"}.get(
            key.curve.name, f"ECDSA {key.curve.name}"
        )
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, mldsa.MLDSA65PublicKey):
        return "ML-DSA-65"
    return type(key).__name__


def private_key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def load_private_key(
    data: bytes, passphrase: bytes | None = None, *, what: str = "key"
) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        # cryptography raises TypeError for "encrypted but no password" and vice versa.
        if passphrase is None:
            raise KeyMaterialError(f"{what} is encrypted: a passphrase is required") from exc
        raise KeyMaterialError(f"{what} is not encrypted, but a passphrase was given") from exc
    except ValueError as exc:
        if passphrase is not None:
            raise KeyMaterialError(
                f"cannot decrypt {what}: wrong passphrase or corrupt file"
            ) from exc
        raise KeyMaterialError(f"cannot load {what}: not a PEM private key") from exc
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | rsa.RSAPrivateKey
        | mldsa.MLDSA65PrivateKey,
    ):
        raise KeyMaterialError(f"{what} has unsupported type {type(key).__name__}")
    return key


def is_encrypted_pem(data: bytes) -> bool:
    """Whether a PEM private key is passphrase-protected: encrypted PKCS#8 (RFC 5958 §3,
    ``ENCRYPTED PRIVATE KEY``) or a legacy OpenSSL ``Proc-Type: 4,ENCRYPTED`` header."""
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(mode)  # the umask may have narrowed O_CREAT's mode; be exact
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_private_file(path: Path, data: bytes) -> None:
    """Write key material: mode 0600, atomically."""
    _atomic_write(path, data, 0o600)


def write_public_file(path: Path, data: bytes) -> None:
    _atomic_write(path, data, 0o644)
