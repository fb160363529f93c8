"""ECH keys and a public-name certificate for the ECH tests (engine pairs and Go peers)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.tls.credentials import Credential
from sidecar.tls.ech import ECHKey, generate_ech_key, push_config_list

from .pki import NOW

PUBLIC_NAME = "public.example.net"
INNER_NAME = "x.example.org"


@dataclass(frozen=True)
class PublicName:
    """A WebPKI-style certificate for the ECH public name and the root that signs it."""

    credential: Credential
    root: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@cache
def public_name_credential(at: dt.datetime = NOW) -> PublicName:
    root_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    start, end = at - dt.timedelta(hours=1), at + dt.timedelta(hours=1)
    root = (
        x509.CertificateBuilder()
        .subject_name(_name("ECH public name root"))
        .issuer_name(_name("ECH public name root"))
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(PUBLIC_NAME))
        .issuer_name(root.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(PUBLIC_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA256())
    )
    return PublicName(Credential((leaf,), leaf_key), root, leaf_key)


def ech_key(config_id: int) -> ECHKey:
    return generate_ech_key(config_id, PUBLIC_NAME)


def config_list(*keys: ECHKey) -> bytes:
    return push_config_list(k.config for k in keys)
