"""JSON Web Keys (RFC 7517/7518/8037) for the public keys Trellis puts in bundles."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa

from ca.keys import PublicKey

__all__ = ["JwkError", "b64url", "b64url_decode", "jwk_thumbprint", "key_from_jwk", "key_to_jwk"]

_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}


# RFC 9964 §5: an ML-DSA JWK is kty "AKP" with the parameter set in "alg" and the raw
# FIPS 204 public key in "pub"; bundles carry it beside the x5c of an ML-DSA authority.
_AKP: dict[str, type[mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey]] = {
    "ML-DSA-44": mldsa.MLDSA44PublicKey,
    "ML-DSA-65": mldsa.MLDSA65PublicKey,
    "ML-DSA-87": mldsa.MLDSA87PublicKey,
}


class JwkError(ValueError):
    """A JWK is malformed or of an unsupported type."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or any(c in text for c in "=+/ \n\r\t"):
        raise JwkError("value is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise JwkError(f"bad base64url: {exc}") from exc


def _int_bytes(value: int, length: int | None = None) -> bytes:
    length = length or max(1, (value.bit_length() + 7) // 8)
    return value.to_bytes(length, "big")


def key_to_jwk(key: PublicKey | object) -> dict[str, str]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        name = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(
            key.curve.name
        )
        if name is None:
            raise JwkError(f"curve {key.curve.name} has no JWK name")
        size = _CURVES[name][1]
        numbers = key.public_numbers()
        return {
            "kty": "EC",
            "crv": name,
            "x": b64url(_int_bytes(numbers.x, size)),
            "y": b64url(_int_bytes(numbers.y, size)),
        }
    if isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        return {
            "kty": "RSA",
            "n": b64url(_int_bytes(rsa_numbers.n)),
            "e": b64url(_int_bytes(rsa_numbers.e)),
        }
    if isinstance(key, ed25519.Ed25519PublicKey):
        from cryptography.hazmat.primitives import serialization

        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
    for alg, kind in _AKP.items():
        if isinstance(key, kind):
            return {"kty": "AKP", "alg": alg, "pub": b64url(key.public_bytes_raw())}
    raise JwkError(f"{type(key).__name__} cannot be expressed as a JWK")


def _field(jwk: dict[str, Any], name: str) -> str:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise JwkError(f"JWK is missing string member {name!r}")
    return value


def key_from_jwk(jwk: dict[str, Any]) -> PublicKey:
    kty = _field(jwk, "kty")
    if kty == "EC":
        crv = _field(jwk, "crv")
        if crv not in _CURVES:
            raise JwkError(f"unsupported EC curve {crv!r}")
        curve, size = _CURVES[crv]
        x, y = b64url_decode(_field(jwk, "x")), b64url_decode(_field(jwk, "y"))
        if len(x) != size or len(y) != size:
            raise JwkError(f"EC coordinates for {crv} must be {size} bytes")
        try:
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
            ).public_key()
        except ValueError as exc:
            raise JwkError(f"EC point is not on {crv}") from exc
    if kty == "RSA":
        n = int.from_bytes(b64url_decode(_field(jwk, "n")), "big")
        e = int.from_bytes(b64url_decode(_field(jwk, "e")), "big")
        if n.bit_length() < 2048:
            raise JwkError("RSA keys under 2048 bits are refused")
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as exc:
            raise JwkError(f"bad RSA key: {exc}") from exc
    if kty == "OKP":
        if _field(jwk, "crv") != "Ed25519":
            raise JwkError("only Ed25519 OKP keys are supported")
        try:
            return ed25519.Ed25519PublicKey.from_public_bytes(b64url_decode(_field(jwk, "x")))
        except ValueError as exc:
            raise JwkError(f"bad Ed25519 key: {exc}") from exc
    if kty == "AKP":
        alg = _field(jwk, "alg")
        if alg not in _AKP:
            raise JwkError(f"unsupported AKP algorithm {alg!r} (ML-DSA-44, -65 or -87)")
        try:
            return _AKP[alg].from_public_bytes(b64url_decode(_field(jwk, "pub")))
        except ValueError as exc:
            raise JwkError(f"bad {alg} key: {exc}") from exc
    raise JwkError(f"unsupported key type {kty!r}")


def jwk_thumbprint(key: PublicKey | object) -> str:
    """RFC 7638 thumbprint: SHA-256 over the required members in lexicographic order."""
    jwk = key_to_jwk(key)
    required = {
        "EC": ("crv", "kty", "x", "y"),
        "RSA": ("e", "kty", "n"),
        "OKP": ("crv", "kty", "x"),
        "AKP": ("alg", "kty", "pub"),  # RFC 9964 §5.2
    }
    canonical = json.dumps(
        {k: jwk[k] for k in required[jwk["kty"]]}, separators=(",", ":"), sort_keys=True
    )
    return b64url(hashlib.sha256(canonical.encode()).digest())
