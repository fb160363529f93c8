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
    "is_mldsa",
    "key_algorithm_of",
    "load_private_key",
    "private_key_pem",
    "write_private_file",
    "write_public_file",
]

MLDSAPrivateKey: TypeAlias = (
    mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
)
MLDSAPublicKey: TypeAlias = mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey
PrivateKey: TypeAlias = (
    ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | MLDSAPrivateKey
)
PublicKey: TypeAlias = (
    ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey | MLDSAPublicKey
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
    # FIPS 204 parameter sets, security categories 2, 3 and 5; certificates carry them
    # under the RFC 9881 identifiers id-ml-dsa-44/65/87 (2.16.840.1.101.3.4.3.17/18/19).
    MLDSA44 = "mldsa44"
    MLDSA65 = "mldsa65"
    MLDSA87 = "mldsa87"

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
        case KeyAlgorithm.MLDSA44:
            return mldsa.MLDSA44PrivateKey.generate()
        case KeyAlgorithm.MLDSA65:
            return mldsa.MLDSA65PrivateKey.generate()
        case KeyAlgorithm.MLDSA87:
            return mldsa.MLDSA87PrivateKey.generate()


_MLDSA_NAMES: dict[type, tuple[KeyAlgorithm, str]] = {
    mldsa.MLDSA44PublicKey: (KeyAlgorithm.MLDSA44, "ML-DSA-44"),
    mldsa.MLDSA65PublicKey: (KeyAlgorithm.MLDSA65, "ML-DSA-65"),
    mldsa.MLDSA87PublicKey: (KeyAlgorithm.MLDSA87, "ML-DSA-87"),
}


def is_mldsa(key: object) -> bool:
    """Whether ``key`` (public or private) is an ML-DSA key of any parameter set."""
    return isinstance(key, MLDSAPublicKey | MLDSAPrivateKey)


def key_algorithm_of(key: object) -> KeyAlgorithm:
    """The ``KeyAlgorithm`` of a public or private key, e.g. to make more keys like it."""
    public = key.public_key() if isinstance(key, PrivateKey) else key
    if isinstance(public, ec.EllipticCurvePublicKey):
        return KeyAlgorithm.P384 if public.curve.key_size >= 384 else KeyAlgorithm.P256
    if isinstance(public, ed25519.Ed25519PublicKey):
        return KeyAlgorithm.ED25519
    if isinstance(public, rsa.RSAPublicKey):
        return KeyAlgorithm.RSA3072 if public.key_size >= 3072 else KeyAlgorithm.RSA2048
    for kind, (algorithm, _) in _MLDSA_NAMES.items():
        if isinstance(public, kind):
            return algorithm
    raise KeyMaterialError(f"key type {type(key).__name__} is not one Trellis generates")


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
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, MLDSAPublicKey):
        # The parameter set is fixed by the SPKI's algorithm identifier (RFC 9881 §4: no
        # parameters) and the key's length by the set; OpenSSL refuses a key whose length
        # does not match its identifier before it becomes an object here.
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
    for kind, (_, name) in _MLDSA_NAMES.items():
        if isinstance(key, kind):
            return name
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
    if not isinstance(key, PrivateKey):
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
