"""Key exchange groups: the ML-KEM hybrids, X25519, X448, secp256r1/384r1/521r1.

Hybrid groups follow draft-ietf-tls-ecdhe-mlkem:
* X25519MLKEM768 (0x11EC): client share = ML-KEM-768 encapsulation key (1184) ||
  X25519 (32); server share = ML-KEM ciphertext (1088) || X25519 (32); shared secret
  = ML-KEM secret || X25519 secret.
* SecP256r1MLKEM768 (0x11EB): the classical part comes first everywhere:
  client share = P-256 point (65) || ek (1184); server share = point (65) || ct (1088);
  shared secret = ECDH secret || ML-KEM secret.
* SecP384r1MLKEM1024 (0x11ED): the same layout with P-384 (97) and ML-KEM-1024
  (ek 1568, ct 1568).

A server accepts a key share for every group a current peer may send one for; the
client's default key shares stay X25519MLKEM768 and X25519 (`DEFAULT_KEY_SHARES`).

Private keys are derived from bytes the caller's RNG returns, so the engine itself
never draws randomness (ML-KEM encapsulation inside OpenSSL does draw its own).
Every malformed share is `illegal_parameter` (RFC 8446 §4.2.8): a wrong length, a
compressed, off-curve or infinity point (§4.2.8.2; OpenSSL checks the point is on the
curve), a failed encapsulation-key check (FIPS 203 §7.2) or an all-zero X25519/X448
result (RFC 7748 §6).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x448, x25519

from .alerts import AlertDescription, TLSError

Rng = Callable[[int], bytes]


class NamedGroup(IntEnum):
    secp256r1 = 0x0017
    secp384r1 = 0x0018
    secp521r1 = 0x0019
    x25519 = 0x001D
    x448 = 0x001E
    SecP256r1MLKEM768 = 0x11EB
    X25519MLKEM768 = 0x11EC
    SecP384r1MLKEM1024 = 0x11ED


# Every post-quantum hybrid: a server preferring one retries for it rather than settle
# for a classical share (server.py).
HYBRID_GROUPS: frozenset[NamedGroup] = frozenset(
    {NamedGroup.X25519MLKEM768, NamedGroup.SecP256r1MLKEM768, NamedGroup.SecP384r1MLKEM1024}
)
# Every group, in preference order: post-quantum hybrids first, then the classical
# groups by how widely peers share them. As a server this is what a client's key share
# may use without a HelloRetryRequest; a client lists them in supported_groups but
# sends shares only for DEFAULT_KEY_SHARES.
DEFAULT_GROUPS: tuple[NamedGroup, ...] = (
    NamedGroup.X25519MLKEM768,
    NamedGroup.SecP256r1MLKEM768,
    NamedGroup.SecP384r1MLKEM1024,
    NamedGroup.x25519,
    NamedGroup.secp256r1,
    NamedGroup.secp384r1,
    NamedGroup.secp521r1,
    NamedGroup.x448,
)
DEFAULT_KEY_SHARES: tuple[NamedGroup, ...] = (NamedGroup.X25519MLKEM768, NamedGroup.x25519)

MLKEM_EK_LEN = 1184
MLKEM_CT_LEN = 1088
MLKEM1024_EK_LEN = 1568
MLKEM1024_CT_LEN = 1568
X25519_LEN = 32
X448_LEN = 56
# RFC 8446 §4.2.8.2: UncompressedPointRepresentation, 0x04 || X || Y.
P256_LEN = 65
P384_LEN = 97
P521_LEN = 133
_CURVES: dict[int, tuple[ec.EllipticCurve, int]] = {
    NamedGroup.secp256r1: (ec.SECP256R1(), P256_LEN),
    NamedGroup.secp384r1: (ec.SECP384R1(), P384_LEN),
    NamedGroup.secp521r1: (ec.SECP521R1(), P521_LEN),
}
# The order n of each curve's base point (SEC 2 §2.4-2.6): private scalars are drawn
# from [1, n-1].
_ORDERS: dict[str, int] = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
        "581a0db248b0a77aecec196accc52973",
        16,
    ),
    "secp521r1": int(
        "01ff" + "ffffffff" * 7 + "fffffffa"
        "51868783bf2f966b7fcc0148f709a5d03bb5c9b8899c47aebb6fb71e91386409",
        16,
    ),
}


MLKEMPrivateKey = mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey


@dataclass(frozen=True, slots=True)
class _KemSet:
    """One ML-KEM parameter set (FIPS 203 §8) as the hybrids use it."""

    name: str
    ek_len: int
    ct_len: int
    private: type[mlkem.MLKEM768PrivateKey] | type[mlkem.MLKEM1024PrivateKey]
    public: type[mlkem.MLKEM768PublicKey] | type[mlkem.MLKEM1024PublicKey]


_MLKEM768 = _KemSet(
    "ML-KEM-768", MLKEM_EK_LEN, MLKEM_CT_LEN, mlkem.MLKEM768PrivateKey, mlkem.MLKEM768PublicKey
)
_MLKEM1024 = _KemSet(
    "ML-KEM-1024",
    MLKEM1024_EK_LEN,
    MLKEM1024_CT_LEN,
    mlkem.MLKEM1024PrivateKey,
    mlkem.MLKEM1024PublicKey,
)
# The NIST-curve hybrids (draft-ietf-tls-ecdhe-mlkem §4.1): the ECDH part comes first in
# the shares and in the shared secret, unlike X25519MLKEM768 where ML-KEM comes first.
_EC_HYBRIDS: dict[int, tuple[NamedGroup, _KemSet]] = {
    NamedGroup.SecP256r1MLKEM768: (NamedGroup.secp256r1, _MLKEM768),
    NamedGroup.SecP384r1MLKEM1024: (NamedGroup.secp384r1, _MLKEM1024),
}


def _illegal(reason: str) -> TLSError:
    return TLSError(AlertDescription.illegal_parameter, reason)


# --- primitives wrapped with TLS's error mapping --------------------------------------


def _x25519_private(rng: Rng) -> x25519.X25519PrivateKey:
    return x25519.X25519PrivateKey.from_private_bytes(rng(32))


def _x25519_exchange(private: x25519.X25519PrivateKey, peer: bytes) -> bytes:
    if len(peer) != X25519_LEN:
        raise _illegal("bad X25519 share length")
    try:
        # OpenSSL refuses an all-zero result (RFC 7748 §6.1, RFC 8446 §7.4.2).
        return private.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
    except ValueError as exc:
        raise _illegal("X25519 exchange failed (low-order point)") from exc


def _x448_private(rng: Rng) -> x448.X448PrivateKey:
    return x448.X448PrivateKey.from_private_bytes(rng(56))


def _x448_exchange(private: x448.X448PrivateKey, peer: bytes) -> bytes:
    if len(peer) != X448_LEN:
        raise _illegal("bad X448 share length")
    try:
        # RFC 7748 §6.2: an all-zero result means a low-order point; OpenSSL refuses it.
        return private.exchange(x448.X448PublicKey.from_public_bytes(peer))
    except ValueError as exc:
        raise _illegal("X448 exchange failed (low-order point)") from exc


def _ec_private(curve: ec.EllipticCurve, rng: Rng) -> ec.EllipticCurvePrivateKey:
    order = _ORDERS[curve.name]
    # 64 extra bits make the bias of the reduction negligible (FIPS 186-5 A.4.1).
    scalar = int.from_bytes(rng((curve.key_size + 7) // 8 + 8), "big") % (order - 1) + 1
    return ec.derive_private_key(scalar, curve)


def _ec_public_bytes(private: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return private.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _ec_exchange(private: ec.EllipticCurvePrivateKey, peer: bytes, length: int) -> bytes:
    # RFC 8446 §4.2.8.2: only the uncompressed point form is allowed, so the point at
    # infinity (the one-byte 0x00) is a wrong length; OpenSSL refuses off-curve points.
    if len(peer) != length or peer[0] != 4:
        raise _illegal("bad ECDHE share")
    try:
        public = ec.EllipticCurvePublicKey.from_encoded_point(private.curve, peer)
        return private.exchange(ec.ECDH(), public)
    except ValueError as exc:
        raise _illegal("invalid ECDHE point") from exc


def _mlkem_private(rng: Rng, kem: _KemSet = _MLKEM768) -> MLKEMPrivateKey:
    # FIPS 203 §7.1: the 64-byte seed (d || z) determines the key pair.
    return kem.private.from_seed_bytes(rng(64))


def _mlkem_encapsulate(ek: bytes, kem: _KemSet = _MLKEM768) -> tuple[bytes, bytes]:
    """(shared secret, ciphertext); the FIPS 203 key check failing is illegal_parameter."""
    if len(ek) != kem.ek_len:
        raise _illegal(f"bad {kem.name} encapsulation key length")
    try:
        secret, ciphertext = kem.public.from_public_bytes(ek).encapsulate()
    except ValueError as exc:
        raise _illegal(f"{kem.name} encapsulation key check failed") from exc
    return secret, ciphertext


def _mlkem_decapsulate(private: MLKEMPrivateKey, ct: bytes, kem: _KemSet = _MLKEM768) -> bytes:
    if len(ct) != kem.ct_len:
        raise _illegal(f"bad {kem.name} ciphertext length")
    try:
        return private.decapsulate(ct)
    except ValueError as exc:
        raise _illegal(f"{kem.name} decapsulation failed") from exc


# --- client side ----------------------------------------------------------------------


class ClientKeyShare:
    """A client's private state for one offered group."""

    __slots__ = ("_ec", "_kem", "_x", "_x448", "group", "public")

    def __init__(self, group: NamedGroup, rng: Rng) -> None:
        self.group = group
        self._x: x25519.X25519PrivateKey | None = None
        self._ec: ec.EllipticCurvePrivateKey | None = None
        self._kem: MLKEMPrivateKey | None = None
        self._x448: x448.X448PrivateKey | None = None
        if group == NamedGroup.x25519:
            self._x = _x25519_private(rng)
            self.public = self._x.public_key().public_bytes_raw()
        elif group == NamedGroup.x448:
            self._x448 = _x448_private(rng)
            self.public = self._x448.public_key().public_bytes_raw()
        elif group in _CURVES:
            self._ec = _ec_private(_CURVES[group][0], rng)
            self.public = _ec_public_bytes(self._ec)
        elif group == NamedGroup.X25519MLKEM768:
            self._kem = _mlkem_private(rng)
            self._x = _x25519_private(rng)
            self.public = (
                self._kem.public_key().public_bytes_raw() + self._x.public_key().public_bytes_raw()
            )
        elif group in _EC_HYBRIDS:
            curve_group, kem = _EC_HYBRIDS[group]
            self._ec = _ec_private(_CURVES[curve_group][0], rng)
            self._kem = _mlkem_private(rng, kem)
            self.public = _ec_public_bytes(self._ec) + self._kem.public_key().public_bytes_raw()
        else:  # pragma: no cover - config validation prevents this
            raise ValueError(f"unsupported group {group!r}")

    def complete(self, server_share: bytes) -> bytes:
        """The shared secret from the server's key_share (illegal_parameter if bad)."""
        group = self.group
        if group == NamedGroup.x25519:
            assert self._x is not None
            return _x25519_exchange(self._x, server_share)
        if group == NamedGroup.x448:
            assert self._x448 is not None
            return _x448_exchange(self._x448, server_share)
        if group in _CURVES:
            assert self._ec is not None
            return _ec_exchange(self._ec, server_share, _CURVES[group][1])
        if group == NamedGroup.X25519MLKEM768:
            assert self._kem is not None and self._x is not None
            if len(server_share) != MLKEM_CT_LEN + X25519_LEN:
                raise _illegal("bad X25519MLKEM768 server share length")
            kem_ss = _mlkem_decapsulate(self._kem, server_share[:MLKEM_CT_LEN])
            return kem_ss + _x25519_exchange(self._x, server_share[MLKEM_CT_LEN:])
        assert self._ec is not None and self._kem is not None
        curve_group, kem = _EC_HYBRIDS[group]
        point_len = _CURVES[curve_group][1]
        if len(server_share) != point_len + kem.ct_len:
            raise _illegal(f"bad {group.name} server share length")
        ecdh = _ec_exchange(self._ec, server_share[:point_len], point_len)
        return ecdh + _mlkem_decapsulate(self._kem, server_share[point_len:], kem)


# --- server side ----------------------------------------------------------------------


def server_exchange(group: int, client_share: bytes, rng: Rng) -> tuple[bytes, bytes]:
    """(server key_share bytes, shared secret) answering `client_share` for `group`."""
    if group == NamedGroup.x25519:
        private = _x25519_private(rng)
        secret = _x25519_exchange(private, client_share)
        return private.public_key().public_bytes_raw(), secret
    if group == NamedGroup.x448:
        private448 = _x448_private(rng)
        secret = _x448_exchange(private448, client_share)
        return private448.public_key().public_bytes_raw(), secret
    if group in _CURVES:
        curve, length = _CURVES[group]
        ec_private = _ec_private(curve, rng)
        secret = _ec_exchange(ec_private, client_share, length)
        return _ec_public_bytes(ec_private), secret
    if group == NamedGroup.X25519MLKEM768:
        if len(client_share) != MLKEM_EK_LEN + X25519_LEN:
            raise _illegal("bad X25519MLKEM768 client share length")
        kem_ss, ct = _mlkem_encapsulate(client_share[:MLKEM_EK_LEN])
        private = _x25519_private(rng)
        x_ss = _x25519_exchange(private, client_share[MLKEM_EK_LEN:])
        return ct + private.public_key().public_bytes_raw(), kem_ss + x_ss
    if group in _EC_HYBRIDS:
        curve_group, kem = _EC_HYBRIDS[group]
        curve, point_len = _CURVES[curve_group]
        if len(client_share) != point_len + kem.ek_len:
            raise _illegal(f"bad {NamedGroup(group).name} client share length")
        ec_private = _ec_private(curve, rng)
        ecdh = _ec_exchange(ec_private, client_share[:point_len], point_len)
        kem_ss, ct = _mlkem_encapsulate(client_share[point_len:], kem)
        return _ec_public_bytes(ec_private) + ct, ecdh + kem_ss
    raise _illegal(f"unsupported group {group}")
