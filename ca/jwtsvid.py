"""JWT-SVIDs (SPIFFE JWT-SVID standard): signing by a JWT authority, and validation.

Tokens are compact JWS. Validation trusts nothing in a token until its signature has been
checked with a key from the bundle of the trust domain its ``sub`` claims; ``alg: none``
and HMAC algorithms are refused outright (JWT-SVID §3).
"""

from __future__ import annotations

import datetime as dt
import json
import math
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
    "CLOCK_SKEW_LEEWAY",
    "DEFAULT_JWT_SVID_TTL",
    "MAX_JSON_DEPTH",
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
# Clock skew tolerated between issuer and validator, for "not yet" checks only (nbf, iat):
# exp is never stretched, so a stolen token lives no longer than its issuer allowed.
CLOCK_SKEW_LEEWAY = dt.timedelta(seconds=30)
# JWT-SVID headers and claims are flat documents; deeper JSON is refused before any of it
# reaches code that recurses (json's own decoder, protobuf's Struct, which a peer's
# decoder caps at 100 levels).
MAX_JSON_DEPTH = 16
# NumericDate (RFC 7519 §2) bounds: a datetime can represent up to the year 9999.
_MAX_NUMERIC_DATE = 253402300799
# A JSON integer longer than this cannot be a NumericDate or any claim we carry; bounding
# it keeps int() and protobuf's double conversion away from numbers of any size.
_MAX_INT_DIGITS = 20

_EC_ALGS: dict[str, tuple[hashes.HashAlgorithm, str, int]] = {
    "ES256": (hashes.SHA256(), "secp256r1", 32),
    "ES384": (hashes.SHA384(), "secp384r1", 48),
    "ES512": (hashes.SHA512(), "secp521r1", 66),
}
# Group orders n of the NIST curves (SEC 2 §2.4.2, §2.5.1, §2.6.1), for the low-S rule.
_ORDERS: dict[str, int] = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    "secp521r1": int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA51868783BF2F966B7FCC"
        "0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
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
        # Low-S: (r, s) and (r, n - s) both verify; emitting only s <= n/2 keeps our tokens
        # acceptable to validators that refuse the malleable twin (as this module does).
        order = _ORDERS[self.private_key.curve.name]
        s = min(s, order - s)
        signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        token = f"{signing_input.decode()}.{b64url(signature)}"
        return JwtSvid(
            token, spiffe_id, audience, dt.datetime.fromtimestamp(expiry, dt.UTC), claims
        )


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN, Infinity and -Infinity, which RFC 8259 §6 does not.
    raise ValueError(f"{name} is not JSON")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise ValueError(f"{text} is out of range")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (iterative: the value may be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level <= MAX_JSON_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, level + 1) for child in children)
    return deepest


def _decode_json(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(
            b64url_decode(part),
            parse_constant=_refuse_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
        )
    except RecursionError as exc:  # the C decoder recurses once per level
        raise JwtSvidError("malformed", f"{what} nests deeper than {MAX_JSON_DEPTH}") from exc
    except (JwkError, ValueError, UnicodeDecodeError) as exc:
        raise JwtSvidError("malformed", f"{what} is not base64url JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise JwtSvidError("malformed", f"{what} is not a JSON object")
    if _depth(value) > MAX_JSON_DEPTH:
        raise JwtSvidError("malformed", f"{what} nests deeper than {MAX_JSON_DEPTH}")
    return value


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 §2): seconds since the epoch, finite, in range."""
    if name not in claims:
        return None
    value = claims[name]
    # bool is an int in Python; JSON true is not a date.
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise JwtSvidError("bad-claim", f"{name} claim is not a NumericDate")
    if not 0 <= value <= _MAX_NUMERIC_DATE:
        raise JwtSvidError("bad-claim", f"{name} claim {value!r} is out of range")
    return float(value)


def _verify_signature(alg: str, key: PublicKey, signing_input: bytes, signature: bytes) -> None:
    try:
        if alg in _EC_ALGS:
            hash_alg, curve, size = _EC_ALGS[alg]
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve:
                raise JwtSvidError("key-mismatch", f"key {key_type(key)} cannot verify {alg}")
            if len(signature) != 2 * size:
                raise JwtSvidError("bad-signature", f"{alg} signature must be {2 * size} bytes")
            r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            # Refuse the malleable twin (r, n - s): one token, one accepted encoding. This is
            # the low-S rule (as in Bitcoin's BIP 62 and libsecp256k1); RFC 7518 §3.4 fixes
            # the length, not which of the two s values.
            if s > _ORDERS[curve] // 2:
                raise JwtSvidError("non-canonical-signature", f"{alg} signature has a high S")
            der = encode_dss_signature(r, s)
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
    exp = _numeric_date(claims, "exp")
    if exp is None:
        raise JwtSvidError("missing-expiry", "exp claim is missing")
    instant = now.timestamp()
    if instant >= exp:
        raise JwtSvidError("expired", "token has expired")
    # RFC 7519 §4.1.5: not before nbf; iat in the future means the issuer's clock or the
    # token is wrong. Both with the skew leeway, neither optional once present.
    leeway = CLOCK_SKEW_LEEWAY.total_seconds()
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and instant + leeway < nbf:
        raise JwtSvidError("not-yet-valid", "token is not valid yet (nbf is in the future)")
    iat = _numeric_date(claims, "iat")
    if iat is not None and instant + leeway < iat:
        raise JwtSvidError("issued-in-future", "token was issued in the future (iat)")
    aud = claims.get("aud")
    audiences = (aud,) if isinstance(aud, str) else tuple(aud) if isinstance(aud, list) else ()
    if not audiences or not all(isinstance(a, str) for a in audiences):
        raise JwtSvidError("missing-audience", "aud claim is missing")
    if audience not in audiences:
        raise JwtSvidError("wrong-audience", f"token is not for audience {audience!r}")
    return JwtSvid(token, spiffe_id, audiences, dt.datetime.fromtimestamp(exp, dt.UTC), claims)
