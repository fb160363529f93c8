"""JWT-SVIDs (SPIFFE JWT-SVID standard): signing by a JWT authority, and validation.

Tokens are compact JWS. Validation trusts nothing in a token until its signature has been
checked with a key from the bundle of the trust domain its ``sub`` claims; ``alg: none``
and HMAC algorithms are refused outright (JWT-SVID §3).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ca.jwk import JwkError, b64url, b64url_decode, jwk_thumbprint
from ca.keys import KeyAlgorithm, PrivateKey, PublicKey, generate_private_key
from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain

__all__ = [
    "DEFAULT_JWT_SVID_TTL",
    "MAX_JWT_SVID_TTL",
    "MAX_TOKEN_BYTES",
    "JwtAuthority",
    "JwtSvid",
    "JwtSvidError",
    "validate_jwt_svid",
]

DEFAULT_JWT_SVID_TTL = dt.timedelta(minutes=5)
MAX_JWT_SVID_TTL = dt.timedelta(hours=24)
MAX_TOKEN_BYTES = 8 * 1024

_EC_ALGS: dict[str, tuple[hashes.HashAlgorithm, str, int]] = {
    "ES256": (hashes.SHA256(), "secp256r1", 32),
    "ES384": (hashes.SHA384(), "secp384r1", 48),
    "ES512": (hashes.SHA512(), "secp521r1", 66),
}
_RSA_HASHES: dict[str, hashes.HashAlgorithm] = {
    "RS256": hashes.SHA256(),
    "RS384": hashes.SHA384(),
    "RS512": hashes.SHA512(),
    "PS256": hashes.SHA256(),
    "PS384": hashes.SHA384(),
    "PS512": hashes.SHA512(),
}


class JwtSvidError(ValueError):
    """A JWT-SVID is refused; ``reason`` labels why (for metrics and gRPC details)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{detail} [{reason}]")


@dataclass(frozen=True, slots=True)
class JwtSvid:
    token: str
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expiry: dt.datetime
    claims: Mapping[str, Any]


def _json_b64(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


@dataclass(frozen=True)
class JwtAuthority:
    """A JWT signing key with its ``kid`` (the RFC 7638 thumbprint of its public key)."""

    private_key: PrivateKey
    key_id: str

    @classmethod
    def generate(cls, algorithm: KeyAlgorithm = KeyAlgorithm.P256) -> JwtAuthority:
        return cls.from_key(generate_private_key(algorithm))

    @classmethod
    def from_key(cls, key: PrivateKey) -> JwtAuthority:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in (
            "secp256r1",
            "secp384r1",
        ):
            raise ValueError("a JWT authority key must be ECDSA P-256 (ES256) or P-384 (ES384)")
        return cls(key, jwk_thumbprint(key.public_key()))

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    @property
    def algorithm(self) -> str:
        assert isinstance(self.private_key, ec.EllipticCurvePrivateKey)
        return "ES384" if self.private_key.curve.name == "secp384r1" else "ES256"

    def sign(
        self,
        spiffe_id: SpiffeId | str,
        audience: Sequence[str],
        *,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_JWT_SVID_TTL,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> JwtSvid:
        spiffe_id = SpiffeId(spiffe_id)
        audience = tuple(audience)
        if not audience or not all(isinstance(a, str) and a for a in audience):
            raise JwtSvidError(
                "missing-audience", "a JWT-SVID needs at least one non-empty audience"
            )
        if ttl <= dt.timedelta(0) or ttl > MAX_JWT_SVID_TTL:
            raise JwtSvidError("bad-ttl", f"JWT-SVID TTL must be in (0, {MAX_JWT_SVID_TTL}]")
        issued = int(now.timestamp())
        expiry = issued + int(ttl.total_seconds())
        claims: dict[str, Any] = dict(extra_claims or {})
        claims.update(
            {
                "sub": str(spiffe_id),
                "aud": list(audience) if len(audience) > 1 else audience[0],
                "iat": issued,
                "exp": expiry,
            }
        )
        alg = self.algorithm
        header = {"alg": alg, "kid": self.key_id, "typ": "JWT"}
        signing_input = f"{_json_b64(header)}.{_json_b64(claims)}".encode()
        hash_alg, _, size = _EC_ALGS[alg]
        assert isinstance(self.private_key, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(self.private_key.sign(signing_input, ec.ECDSA(hash_alg)))
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        token = f"{signing_input.decode()}.{b64url(signature)}"
        return JwtSvid(
            token, spiffe_id, audience, dt.datetime.fromtimestamp(expiry, dt.UTC), claims
        )


def _decode_json(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(b64url_decode(part))
    except (JwkError, ValueError, UnicodeDecodeError) as exc:
        raise JwtSvidError("malformed", f"{what} is not base64url JSON") from exc
    if not isinstance(value, dict):
        raise JwtSvidError("malformed", f"{what} is not a JSON object")
    return value


def _verify_signature(alg: str, key: PublicKey, signing_input: bytes, signature: bytes) -> None:
    try:
        if alg in _EC_ALGS:
            hash_alg, curve, size = _EC_ALGS[alg]
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve:
                raise JwtSvidError("key-mismatch", f"key {key_type(key)} cannot verify {alg}")
            if len(signature) != 2 * size:
                raise JwtSvidError("bad-signature", f"{alg} signature must be {2 * size} bytes")
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            key.verify(der, signing_input, ec.ECDSA(hash_alg))
        elif alg in _RSA_HASHES:
            if not isinstance(key, rsa.RSAPublicKey):
                raise JwtSvidError("key-mismatch", f"key {key_type(key)} cannot verify {alg}")
            hash_alg = _RSA_HASHES[alg]
            pad: padding.AsymmetricPadding = (
                padding.PSS(padding.MGF1(hash_alg), padding.PSS.DIGEST_LENGTH)
                if alg.startswith("PS")
                else padding.PKCS1v15()
            )
            key.verify(signature, signing_input, pad, hash_alg)
        else:
            raise JwtSvidError("unsupported-algorithm", f"algorithm {alg!r} is not allowed")
    except InvalidSignature as exc:
        raise JwtSvidError("bad-signature", "signature does not verify") from exc


def key_type(key: object) -> str:
    return type(key).__name__


JwtKeyLookup = Callable[[TrustDomain], Mapping[str, PublicKey] | None]


def validate_jwt_svid(
    token: str, audience: str, keys: JwtKeyLookup, *, now: dt.datetime
) -> JwtSvid:
    """Validate a JWT-SVID for ``audience``; ``keys`` maps a trust domain to its JWT keys."""
    if not isinstance(token, str) or not token:
        raise JwtSvidError("malformed", "token is empty")
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtSvidError("too-large", f"token exceeds {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtSvidError("malformed", "token is not a compact JWS (three dot-separated parts)")
    header = _decode_json(parts[0], "header")
    claims = _decode_json(parts[1], "claims")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in _EC_ALGS | _RSA_HASHES:
        raise JwtSvidError("unsupported-algorithm", f"algorithm {alg!r} is not allowed")
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise JwtSvidError("malformed", f"typ {typ!r} is not JWT or JOSE")
    if "crit" in header:
        raise JwtSvidError("malformed", "critical header parameters are not supported")
    kid = header.get("kid")
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise JwtSvidError("missing-subject", "sub claim is missing")
    try:
        spiffe_id = SpiffeId(sub)
    except SpiffeIdError as exc:
        raise JwtSvidError("bad-subject", f"sub is not a SPIFFE ID: {exc}") from exc
    trusted = keys(spiffe_id.trust_domain)
    if not trusted:
        raise JwtSvidError(
            "unknown-trust-domain", f"no JWT keys for trust domain {spiffe_id.trust_domain}"
        )
    if not isinstance(kid, str) or kid not in trusted:
        raise JwtSvidError(
            "unknown-key", f"key id {kid!r} is not in the bundle of {spiffe_id.trust_domain}"
        )
    try:
        signature = b64url_decode(parts[2])
    except JwkError as exc:
        raise JwtSvidError("malformed", "signature is not base64url") from exc
    _verify_signature(alg, trusted[kid], f"{parts[0]}.{parts[1]}".encode(), signature)
    # Only now are the claims trustworthy.
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise JwtSvidError("missing-expiry", "exp claim is missing")
    if now.timestamp() >= exp:
        raise JwtSvidError("expired", "token has expired")
    aud = claims.get("aud")
    audiences = (aud,) if isinstance(aud, str) else tuple(aud) if isinstance(aud, list) else ()
    if not audiences or not all(isinstance(a, str) for a in audiences):
        raise JwtSvidError("missing-audience", "aud claim is missing")
    if audience not in audiences:
        raise JwtSvidError("wrong-audience", f"token is not for audience {audience!r}")
    return JwtSvid(token, spiffe_id, audiences, dt.datetime.fromtimestamp(exp, dt.UTC), claims)
