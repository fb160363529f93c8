"""The local-mode CA directory: where the root, cluster intermediates and bundle live.

```
DIR/root.crt                          the root certificate (public)
DIR/root.key                          the root key, encrypted PKCS#8, 0600
DIR/bundle.json                       the trust bundle (SPIFFE format): roots + JWT keys
DIR/clusters/NAME/intermediate.crt    the cluster intermediate (public)
DIR/clusters/NAME/intermediate.key    its key, 0600 (the cluster's Secret in Kubernetes)
DIR/clusters/NAME/jwt.key             the cluster's JWT-SVID signing key, 0600
DIR/next-root.crt, next-root.key      a prepared root (``ca root prepare``), key encrypted
DIR/previous-root.crt                 the root ``ca root activate`` replaced, until retired
DIR/clusters/NAME/superseded/S.crt    intermediates replaced (serial S), until their root
                                      is retired: ``ca root retire`` checks them
DIR/clusters/NAME/issued.json         written by ``ca serve``: how long SVIDs signed by each
                                      intermediate stay valid (``ca.rotation``)
```

Rotation is described in ``ca.rotation``.

The root key is always encrypted (``$TRELLIS_ROOT_PASSPHRASE`` or ``--passphrase-file``).
The cluster keys are encrypted when a key passphrase is given (``$TRELLIS_KEY_PASSPHRASE``
or ``--key-passphrase-file``), which local mode should use: on a shared disk 0600 guards a
key only from other users, not from root, a backup or a copied directory. Unencrypted
cluster keys stay accepted, because in Kubernetes they come from a Secret, which is the
cluster's own protection (RBAC, optional encryption at rest) and has no passphrase to give.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authority import IntermediateAuthority, RootAuthority
from ca.bundle import BundleError, TrustBundle, load_pem_certificates
from ca.jwtsvid import JwtAuthority
from ca.keys import (
    KeyMaterialError,
    PrivateKey,
    is_encrypted_pem,
    load_private_key,
    private_key_pem,
    write_private_file,
    write_public_file,
)
from ca.spiffeid import TrustDomain
from ca.x509svid import SvidError, spiffe_id_of

__all__ = [
    "KEY_PASSPHRASE_ENV",
    "CaStore",
    "StoreError",
    "load_protected_key",
    "read_key_passphrase",
    "read_passphrase",
]

PASSPHRASE_ENV = "TRELLIS_ROOT_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
KEY_PASSPHRASE_ENV = "TRELLIS_KEY_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
MIN_PASSPHRASE = 8


class StoreError(Exception):
    """The CA directory is missing something or holds something unreadable."""


def _passphrase(file: Path | None, env_name: str, what: str) -> bytes | None:
    if file is not None:
        try:
            value = file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise StoreError(f"cannot read passphrase file {file}: {exc.strerror}") from exc
    else:
        env = os.environ.get(env_name)
        if env is None:
            return None
        value = env.encode()
    if len(value) < MIN_PASSPHRASE:
        raise StoreError(f"the {what} passphrase must be at least {MIN_PASSPHRASE} characters")
    return value


def read_passphrase(passphrase_file: Path | None) -> bytes:
    """The root passphrase: from a file if given, else ``$TRELLIS_ROOT_PASSPHRASE``."""
    value = _passphrase(passphrase_file, PASSPHRASE_ENV, "root")
    if value is None:
        raise StoreError(f"no root passphrase: set {PASSPHRASE_ENV} or pass --passphrase-file")
    return value


def read_key_passphrase(passphrase_file: Path | None) -> bytes | None:
    """The passphrase of the cluster and agent keys: from ``--key-passphrase-file`` if
    given, else ``$TRELLIS_KEY_PASSPHRASE``, else None (keys are written unencrypted)."""
    return _passphrase(passphrase_file, KEY_PASSPHRASE_ENV, "key")


def load_protected_key(data: bytes, passphrase: bytes | None, *, what: str) -> PrivateKey:
    """A key whose encryption is opt-in (cluster intermediate, JWT, agent).

    An encrypted key needs the passphrase. An unencrypted one loads with or without it, so
    turning a passphrase on needs no migration step: the next write encrypts the key.
    Raises ``KeyMaterialError`` whose one line names ``what`` (which should hold the path).
    """
    if not is_encrypted_pem(data):
        return load_private_key(data, what=what)
    if passphrase is None:
        raise KeyMaterialError(
            f"{what} is encrypted: set {KEY_PASSPHRASE_ENV} or pass --key-passphrase-file"
        )
    return load_private_key(data, passphrase, what=what)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise StoreError(f"{what} not found: {path}") from exc
    except OSError as exc:
        raise StoreError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _one_cert(path: Path, what: str) -> x509.Certificate:
    try:
        certs = load_pem_certificates(_read(path, what), what=str(path))
    except BundleError as exc:
        raise StoreError(str(exc)) from exc
    return certs[0]


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CaStore:
    root_dir: Path
    # Encrypts the cluster keys this store writes and opens the encrypted ones it reads;
    # None writes them unencrypted (and still reads unencrypted ones). Never in a repr.
    key_passphrase: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def root_cert_path(self) -> Path:
        return self.root_dir / "root.crt"

    @property
    def root_key_path(self) -> Path:
        return self.root_dir / "root.key"

    @property
    def bundle_path(self) -> Path:
        return self.root_dir / "bundle.json"

    @property
    def next_root_cert_path(self) -> Path:
        return self.root_dir / "next-root.crt"

    @property
    def next_root_key_path(self) -> Path:
        return self.root_dir / "next-root.key"

    @property
    def previous_root_cert_path(self) -> Path:
        return self.root_dir / "previous-root.crt"

    def cluster_dir(self, cluster: str) -> Path:
        return self.root_dir / "clusters" / cluster

    def clusters(self) -> list[str]:
        """Every cluster with an intermediate, sorted."""
        base = self.root_dir / "clusters"
        if not base.is_dir():
            return []
        return sorted(d.name for d in base.iterdir() if (d / "intermediate.crt").is_file())

    def superseded_dir(self, cluster: str) -> Path:
        return self.cluster_dir(cluster) / "superseded"

    def issued_path(self, cluster: str) -> Path:
        return self.cluster_dir(cluster) / "issued.json"

    # -- root ---------------------------------------------------------------------------

    def save_root(self, root: RootAuthority, passphrase: bytes, *, overwrite: bool = False) -> None:
        if self.root_cert_path.exists() and not overwrite:
            raise StoreError(f"{self.root_cert_path} already exists; refusing to replace a root")
        # The key first: a root certificate without its key would be useless.
        write_private_file(self.root_key_path, private_key_pem(root.private_key, passphrase))
        write_public_file(self.root_cert_path, _pem(root.certificate))
        bundle = self.load_bundle_or_none(root.trust_domain) or TrustBundle(root.trust_domain)
        self.save_bundle(bundle.with_x509_authorities([root.certificate]))

    def root_certificate(self) -> x509.Certificate:
        return _one_cert(self.root_cert_path, "root certificate")

    def trust_domain(self) -> TrustDomain:
        try:
            return spiffe_id_of(self.root_certificate()).trust_domain
        except SvidError as exc:
            raise StoreError(f"{self.root_cert_path} is not a Trellis root: {exc}") from exc

    def load_root(self, passphrase: bytes) -> RootAuthority:
        cert = self.root_certificate()
        try:
            key = load_private_key(
                _read(self.root_key_path, "root key"), passphrase, what="root key"
            )
            return RootAuthority.load(cert, key)
        except (KeyMaterialError, SvidError) as exc:
            raise StoreError(str(exc)) from exc

    # -- rotation: a prepared root and the one it replaced ---------------------------------

    def prepared_root_certificate(self) -> x509.Certificate | None:
        if not self.next_root_cert_path.exists():
            return None
        return _one_cert(self.next_root_cert_path, "prepared root certificate")

    def save_prepared_root(self, root: RootAuthority, passphrase: bytes) -> None:
        """The next root, encrypted with the root passphrase like the current one; its
        certificate joins the bundle so that every verifier trusts it before it signs."""
        write_private_file(self.next_root_key_path, private_key_pem(root.private_key, passphrase))
        write_public_file(self.next_root_cert_path, _pem(root.certificate))
        self.save_bundle(
            self.load_bundle(root.trust_domain).with_x509_authorities([root.certificate])
        )

    def load_prepared_root(self, passphrase: bytes) -> RootAuthority:
        cert = _one_cert(self.next_root_cert_path, "prepared root certificate")
        try:
            key = load_private_key(
                _read(self.next_root_key_path, "prepared root key"),
                passphrase,
                what="prepared root key",
            )
            return RootAuthority.load(cert, key)
        except (KeyMaterialError, SvidError) as exc:
            raise StoreError(str(exc)) from exc

    def previous_root_certificate(self) -> x509.Certificate | None:
        if not self.previous_root_cert_path.exists():
            return None
        return _one_cert(self.previous_root_cert_path, "previous root certificate")

    def promote_prepared_root(self, prepared: RootAuthority, passphrase: bytes) -> None:
        """The prepared root becomes the root; the old certificate stays as the previous
        root until retired. The old key is overwritten: nothing signs with it again."""
        write_public_file(self.previous_root_cert_path, _pem(self.root_certificate()))
        # Key first, as in save_root; then the certificate that makes it the active root.
        write_private_file(self.root_key_path, private_key_pem(prepared.private_key, passphrase))
        write_public_file(self.root_cert_path, _pem(prepared.certificate))
        self.next_root_key_path.unlink(missing_ok=True)
        self.next_root_cert_path.unlink(missing_ok=True)

    def forget_previous_root(self) -> None:
        self.previous_root_cert_path.unlink(missing_ok=True)

    # -- intermediates ------------------------------------------------------------------

    def save_intermediate(self, intermediate: IntermediateAuthority, jwt: JwtAuthority) -> None:
        directory = self.cluster_dir(intermediate.cluster)
        write_private_file(
            directory / "jwt.key", private_key_pem(jwt.private_key, self.key_passphrase)
        )
        self.replace_intermediate(intermediate)
        bundle = self.load_bundle_or_none(intermediate.trust_domain) or TrustBundle(
            intermediate.trust_domain
        )
        self.save_bundle(bundle.with_jwt_authority(jwt.key_id, jwt.public_key))

    def replace_intermediate(self, intermediate: IntermediateAuthority) -> None:
        """Write a cluster's intermediate (key first: ``ca serve`` reloads on the
        certificate), keeping the certificate it replaces under ``superseded/``: SVIDs it
        signed stay valid, and ``ca root retire`` must know of them."""
        directory = self.cluster_dir(intermediate.cluster)
        current = directory / "intermediate.crt"
        if current.exists():
            with contextlib.suppress(StoreError):
                old = _one_cert(current, "intermediate certificate")
                if old != intermediate.certificate:
                    write_public_file(
                        self.superseded_dir(intermediate.cluster) / f"{old.serial_number:x}.crt",
                        _pem(old),
                    )
        write_private_file(
            directory / "intermediate.key",
            private_key_pem(intermediate.private_key, self.key_passphrase),
        )
        write_public_file(current, _pem(intermediate.certificate))
        # An expired one anchors nothing any more: keep the directory from growing forever.
        now = utcnow()
        for path, cert in self.superseded_intermediates(intermediate.cluster):
            if cert.not_valid_after_utc <= now:
                path.unlink(missing_ok=True)

    def superseded_intermediates(self, cluster: str) -> list[tuple[Path, x509.Certificate]]:
        directory = self.superseded_dir(cluster)
        if not directory.is_dir():
            return []
        return [
            (path, _one_cert(path, "superseded intermediate"))
            for path in sorted(directory.glob("*.crt"))
        ]

    def _cluster_key(self, path: Path, what: str) -> PrivateKey:
        try:
            return load_protected_key(_read(path, what), self.key_passphrase, what=f"{what} {path}")
        except KeyMaterialError as exc:
            raise StoreError(str(exc)) from exc

    def intermediate_certificate(self, cluster: str) -> x509.Certificate:
        """The cluster's intermediate certificate alone: proves the cluster exists without
        opening its key (which may need a passphrase)."""
        directory = self.cluster_dir(cluster)
        if not directory.is_dir():
            raise StoreError(f"no intermediate for cluster {cluster!r} (expected {directory})")
        return _one_cert(directory / "intermediate.crt", "intermediate certificate")

    def load_intermediate(self, cluster: str) -> IntermediateAuthority:
        cert = self.intermediate_certificate(cluster)
        key = self._cluster_key(self.cluster_dir(cluster) / "intermediate.key", "intermediate key")
        try:
            return IntermediateAuthority.load(cert, key, cluster)
        except (KeyMaterialError, SvidError) as exc:
            raise StoreError(str(exc)) from exc

    def load_jwt_authority(self, cluster: str) -> JwtAuthority:
        path = self.cluster_dir(cluster) / "jwt.key"
        key = self._cluster_key(path, "JWT key")
        try:
            return JwtAuthority.from_key(key)
        except ValueError as exc:
            raise StoreError(f"{path}: {exc}") from exc

    # -- bundle -------------------------------------------------------------------------

    def load_bundle_or_none(self, trust_domain: TrustDomain) -> TrustBundle | None:
        if not self.bundle_path.exists():
            return None
        return self.load_bundle(trust_domain)

    def load_bundle(self, trust_domain: TrustDomain | None = None) -> TrustBundle:
        td = trust_domain or self.trust_domain()
        try:
            return TrustBundle.from_json(td, _read(self.bundle_path, "trust bundle"))
        except BundleError as exc:
            raise StoreError(f"{self.bundle_path}: {exc}") from exc

    def save_bundle(self, bundle: TrustBundle) -> None:
        write_public_file(self.bundle_path, bundle.to_json())


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
