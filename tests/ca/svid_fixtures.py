"""Negative X509-SVID fixtures, each named after the one rule it breaks.

They are built in memory with a bare ``CertificateBuilder`` signed by a real intermediate,
so that the only thing wrong with each is the rule in its name.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca import IntermediateAuthority

GOOD_ID = "spiffe://example.org/ns/default/sa/web"


def key_usage(**on: bool) -> x509.KeyUsage:
    fields = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    fields.update(on)
    return x509.KeyUsage(**fields)


def build_leaf(
    issuer: IntermediateAuthority,
    now: dt.datetime,
    *,
    uris: tuple[str, ...] = (GOOD_ID,),
    ca: bool = False,
    ku: x509.KeyUsage | None = None,
    ku_critical: bool = True,
    eku: tuple[x509.ObjectIdentifier, ...] | None = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    not_before: dt.timedelta = dt.timedelta(minutes=-1),
    not_after: dt.timedelta = dt.timedelta(hours=1),
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + not_before)
        .not_valid_after(now + not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer.certificate.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
    )
    if ku is not None:
        builder = builder.add_extension(ku, critical=ku_critical)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
    return builder.sign(issuer.private_key, hashes.SHA256())  # type: ignore[arg-type]


DIGITAL_SIGNATURE = key_usage(digital_signature=True)

# name -> (builder, rule that check_leaf reports)
NEGATIVE_LEAVES: dict[
    str, tuple[Callable[[IntermediateAuthority, dt.datetime], x509.Certificate], str]
] = {
    "leaf-ca-true": (lambda i, n: build_leaf(i, n, ca=True, ku=DIGITAL_SIGNATURE), "leaf-ca-true"),
    "two-uri-sans": (
        lambda i, n: build_leaf(i, n, uris=(GOOD_ID, GOOD_ID + "2"), ku=DIGITAL_SIGNATURE),
        "two-uri-sans",
    ),
    "no-uri-san": (lambda i, n: build_leaf(i, n, uris=(), ku=DIGITAL_SIGNATURE), "no-uri-san"),
    "uri-san-not-spiffe-id": (
        lambda i, n: build_leaf(i, n, uris=("https://example.org/web",), ku=DIGITAL_SIGNATURE),
        "uri-san-not-spiffe-id",
    ),
    "leaf-without-path": (
        lambda i, n: build_leaf(i, n, uris=("spiffe://example.org",), ku=DIGITAL_SIGNATURE),
        "leaf-without-path",
    ),
    "key-cert-sign-on-leaf": (
        lambda i, n: build_leaf(i, n, ku=key_usage(digital_signature=True, key_cert_sign=True)),
        "key-cert-sign-on-leaf",
    ),
    "crl-sign-on-leaf": (
        lambda i, n: build_leaf(i, n, ku=key_usage(digital_signature=True, crl_sign=True)),
        "crl-sign-on-leaf",
    ),
    "missing-key-usage": (lambda i, n: build_leaf(i, n, ku=None), "missing-key-usage"),
    "key-usage-not-critical": (
        lambda i, n: build_leaf(i, n, ku=DIGITAL_SIGNATURE, ku_critical=False),
        "key-usage-not-critical",
    ),
    "no-digital-signature": (
        lambda i, n: build_leaf(i, n, ku=key_usage(key_encipherment=True)),
        "no-digital-signature",
    ),
    "wrong-eku": (
        lambda i, n: build_leaf(
            i, n, ku=DIGITAL_SIGNATURE, eku=(ExtendedKeyUsageOID.CODE_SIGNING,)
        ),
        "wrong-eku",
    ),
}
