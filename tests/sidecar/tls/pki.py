"""Test PKI: root -> intermediate (pathLen 0) -> leaf with one SPIFFE URI SAN.

Built directly with `cryptography` so each negative fixture can break exactly one rule
(named after it: `expired_leaf`, `server_auth_only_leaf`, ...). `ca_issued` uses the
project's own `ca.authority`, whose intermediates carry URI name constraints.
ML-DSA (`mldsa44`, `mldsa65`, `mldsa87`) keys sign certificates through the same builder,
pure ML-DSA with no digest (RFC 9881); `authority("mldsa65")` is an all-ML-DSA
hierarchy and `mixed_authority` an ECDSA root over ML-DSA intermediate and leaves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.spiffeid import SpiffeId
from sidecar.tls import TLSConfig
from sidecar.tls.signatures import MLDSAPrivateKey, PrivateKey

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
TRUST_DOMAIN = "example.org"
CLIENT_ID = SpiffeId("spiffe://example.org/ns/default/sa/client")
SERVER_ID = SpiffeId("spiffe://example.org/ns/default/sa/x")
BOTH = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


class DeterministicRng:
    """A reproducible byte stream (tests only: real configs pass os.urandom)."""

    def __init__(self, seed: bytes = b"trellis") -> None:
        self._seed = seed
        self._counter = 0

    def __call__(self, n: int) -> bytes:
        self._counter += 1
        return hashlib.shake_256(self._seed + self._counter.to_bytes(8, "big")).digest(n)


def _key(kind: str) -> PrivateKey:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "rsa":
        return rsa.generate_private_key(65537, 2048)
    if kind == "mldsa44":
        return mldsa.MLDSA44PrivateKey.generate()
    if kind == "mldsa65":
        return mldsa.MLDSA65PrivateKey.generate()
    if kind == "mldsa87":
        return mldsa.MLDSA87PrivateKey.generate()
    raise ValueError(kind)


def _hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    # Ed25519 and ML-DSA sign the message itself: no digest algorithm.
    if isinstance(key, ed25519.Ed25519PrivateKey | MLDSAPrivateKey):
        return None
    return hashes.SHA256()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass(frozen=True)
class Identity:
    chain: tuple[x509.Certificate, ...]  # leaf, intermediate
    key: PrivateKey
    root: x509.Certificate

    @property
    def bundles(self) -> dict[str, list[x509.Certificate]]:
        return {TRUST_DOMAIN: [self.root]}


@dataclass(frozen=True)
class Authority:
    root: x509.Certificate
    root_key: PrivateKey
    intermediate: x509.Certificate
    intermediate_key: PrivateKey

    def leaf(
        self,
        spiffe_id: str | SpiffeId = SERVER_ID,
        key_kind: str = "p256",
        ekus: Sequence[x509.ObjectIdentifier] = BOTH,
        not_before: dt.datetime = NOW - dt.timedelta(hours=1),
        not_after: dt.datetime = NOW + dt.timedelta(hours=1),
    ) -> Identity:
        key = _key(key_kind)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.intermediate_key.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        if ekus:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
        leaf = builder.sign(self.intermediate_key, _hash(self.intermediate_key))
        return Identity((leaf, self.intermediate), key, self.root)


def _ca_cert(
    subject: str,
    key: PrivateKey,
    issuer: x509.Name,
    issuer_key: PrivateKey,
    path_length: int | None,
    at: dt.datetime = NOW,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - dt.timedelta(days=30))
        .not_valid_after(at + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(issuer_key, _hash(issuer_key))
    )


@cache
def authority(kind: str = "p256", name: str = "Trellis test") -> Authority:
    root_key = _key(kind)
    root = _ca_cert(f"{name} root", root_key, _name(f"{name} root"), root_key, 1)
    inter_key = _key(kind)
    inter = _ca_cert(f"{name} intermediate", inter_key, root.subject, root_key, 0)
    return Authority(root, root_key, inter, inter_key)


@cache
def mixed_authority(
    root_kind: str = "p256", lower_kind: str = "mldsa65", at: dt.datetime = NOW
) -> Authority:
    """A `root_kind` root over a `lower_kind` intermediate (leaves take their own kind)."""
    name = f"Trellis {root_kind}/{lower_kind}"
    root_key = _key(root_kind)
    root = _ca_cert(f"{name} root", root_key, _name(f"{name} root"), root_key, 1, at)
    inter_key = _key(lower_kind)
    inter = _ca_cert(f"{name} intermediate", inter_key, root.subject, root_key, 0, at)
    return Authority(root, root_key, inter, inter_key)


@cache
def mldsa_identity(role: str = "server", kind: str = "mldsa65") -> Identity:
    """An all-ML-DSA chain (root, intermediate and leaf of parameter set `kind`)."""
    return mixed_authority(kind, kind).leaf(SERVER_ID if role == "server" else CLIENT_ID, kind)


@cache
def _live_at() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@cache
def live_identity(role: str = "server", kind: str = "mldsa65", root_kind: str = "") -> Identity:
    """A chain valid around the real clock, for real peers (OpenSSL, Go, the shell),
    which check validity against it: a `root_kind` root (default `kind`) over a `kind`
    intermediate and leaf."""
    at = _live_at()
    return mixed_authority(root_kind or kind, kind, at).leaf(
        SERVER_ID if role == "server" else CLIENT_ID,
        kind,
        not_before=at - dt.timedelta(hours=1),
        not_after=at + dt.timedelta(hours=1),
    )


@cache
def _ca_live_intermediate(kind: str):  # type: ignore[no-untyped-def]
    from ca.authority import RootAuthority
    from ca.keys import KeyAlgorithm
    from ca.spiffeid import TrustDomain

    at = _live_at()
    algorithm = KeyAlgorithm(kind)
    root = RootAuthority.create(
        TrustDomain(TRUST_DOMAIN), now=at - dt.timedelta(hours=1), key_algorithm=algorithm
    )
    inter = root.issue_intermediate(
        "interop", now=at - dt.timedelta(minutes=30), key_algorithm=algorithm
    )
    return root, inter


@cache
def ca_live_identity(role: str = "server", kind: str = "mldsa65") -> Identity:
    """An SVID from the project's CA, root, name-constrained intermediate and leaf all of
    `kind`, valid around the real clock (for real peers)."""
    root, inter = _ca_live_intermediate(kind)
    key = _key(kind)
    svid = inter.issue_x509_svid(
        SERVER_ID if role == "server" else CLIENT_ID,
        key.public_key(),
        now=_live_at() - dt.timedelta(minutes=5),
    )
    return Identity(tuple(svid.chain), key, root.certificate)


@cache
def identity(role: str = "server", key_kind: str = "p256") -> Identity:
    return authority().leaf(SERVER_ID if role == "server" else CLIENT_ID, key_kind)


@cache
def ca_issued(role: str = "server") -> Identity:
    """An SVID from the project's own CA (URI name-constrained intermediate)."""
    from ca.authority import RootAuthority
    from ca.spiffeid import TrustDomain

    root = _ca_root()
    inter = root.issue_intermediate("test", now=NOW - dt.timedelta(minutes=5))
    key = ec.generate_private_key(ec.SECP256R1())
    svid = inter.issue_x509_svid(
        SERVER_ID if role == "server" else CLIENT_ID,
        key.public_key(),
        now=NOW - dt.timedelta(minutes=5),
    )
    del RootAuthority, TrustDomain
    return Identity(tuple(svid.chain), key, root.certificate)


@cache
def _ca_root():  # type: ignore[no-untyped-def]
    from ca.authority import RootAuthority
    from ca.spiffeid import TrustDomain

    return RootAuthority.create(TrustDomain(TRUST_DOMAIN), now=NOW - dt.timedelta(days=1))


def server_config(ident: Identity | None = None, **overrides: object) -> TLSConfig:
    ident = ident or identity("server")
    fields: dict[str, object] = dict(
        rng=DeterministicRng(b"server"),
        certificate_chain=ident.chain,
        private_key=ident.key,
        trust_bundles=ident.bundles,
        alpn_protocols=("h2",),
    )
    fields.update(overrides)
    return TLSConfig(**fields)  # type: ignore[arg-type]


def client_config(ident: Identity | None = None, **overrides: object) -> TLSConfig:
    ident = ident or identity("client")
    fields: dict[str, object] = dict(
        rng=DeterministicRng(b"client"),
        certificate_chain=ident.chain,
        private_key=ident.key,
        trust_bundles=ident.bundles,
        alpn_protocols=("h2",),
    )
    fields.update(overrides)
    return TLSConfig(**fields)  # type: ignore[arg-type]
