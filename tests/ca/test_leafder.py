"""The leaf DER template against ``cryptography``'s CertificateBuilder, its reference.

For the same serial, validity, key and names, the template's TBSCertificate must be the
builder's byte for byte; only the signature (randomised for ECDSA) may differ, and it
must verify under the intermediate's key.
"""

from __future__ import annotations

import datetime as dt
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ca import KeyAlgorithm, RootAuthority, TrustDomain, generate_private_key
from ca.authority import _LEAF_SUBJECT, IntermediateAuthority, IssuanceError
from ca.leafder import LeafTemplate, der_length, der_oid, der_tlv, random_serial, read_tlv
from ca.spiffeid import SpiffeId
from ca.x509svid import check_leaf, leaf_extensions

NOW = dt.datetime(2026, 11, 27, 2, 0, 0, 123456, tzinfo=dt.UTC)
SPIFFE_ID = "spiffe://example.org/ns/default/sa/web"


def _intermediate(algorithm: KeyAlgorithm) -> IntermediateAuthority:
    root = RootAuthority.create(TrustDomain("example.org"), now=NOW)
    return root.issue_intermediate("east", now=NOW, key_algorithm=algorithm)


def _builder_leaf(
    intermediate: IntermediateAuthority,
    public_key: object,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    dns_names: tuple[str, ...],
) -> x509.Certificate:
    from ca.authority import _signature_hash

    builder = (
        x509.CertificateBuilder()
        .subject_name(_LEAF_SUBJECT)
        .issuer_name(intermediate.certificate.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        intermediate.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    )
    for extension, critical in leaf_extensions(SpiffeId(SPIFFE_ID), ski, aki, dns_names):
        builder = builder.add_extension(extension, critical=critical)
    key = intermediate.private_key
    return builder.sign(key, _signature_hash(key))  # type: ignore[arg-type]


def _template_leaf(
    intermediate: IntermediateAuthority,
    public_key: object,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    dns_names: tuple[str, ...],
) -> x509.Certificate:
    spki = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined]
    der = intermediate._leaf_template.build(
        serial=serial,
        not_before=not_before,
        not_after=not_after,
        spki=spki,
        uris=(SPIFFE_ID,),
        dns_names=dns_names,
    )
    return x509.load_der_x509_certificate(der)


@pytest.mark.parametrize(
    "signer",
    [
        KeyAlgorithm.P256,
        KeyAlgorithm.P384,
        KeyAlgorithm.ED25519,
        KeyAlgorithm.RSA2048,
        KeyAlgorithm.MLDSA65,
    ],
)
@pytest.mark.parametrize(
    "subject_key",
    [KeyAlgorithm.P256, KeyAlgorithm.P384, KeyAlgorithm.ED25519, KeyAlgorithm.RSA2048],
)
def test_template_tbs_equals_the_builders_for_every_key_type(
    signer: KeyAlgorithm, subject_key: KeyAlgorithm
) -> None:
    intermediate = _intermediate(signer)
    public_key = generate_private_key(subject_key).public_key()
    args = (public_key, random_serial(), NOW, NOW + dt.timedelta(hours=1), ("web.default.svc",))
    ours = _template_leaf(intermediate, *args)
    reference = _builder_leaf(intermediate, *args)
    assert ours.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert ours.signature_algorithm_oid == reference.signature_algorithm_oid
    ours.verify_directly_issued_by(intermediate.certificate)


@pytest.mark.parametrize(
    "serial", [1, 127, 128, 255, 256, 2**151, 2**152 - 1, 2**158 + 12345, 2**159 - 1]
)
def test_serials_of_every_length_encode_as_the_builder_does(serial: int) -> None:
    intermediate = _intermediate(KeyAlgorithm.P256)
    key = generate_private_key(KeyAlgorithm.P256).public_key()
    args = (key, serial, NOW, NOW + dt.timedelta(hours=1), ())
    ours = _template_leaf(intermediate, *args)
    assert ours.tbs_certificate_bytes == _builder_leaf(intermediate, *args).tbs_certificate_bytes
    assert ours.serial_number == serial


@pytest.mark.parametrize("count", [0, 1, 3, 9, 40])
def test_short_and_long_sans_use_the_right_length_forms(count: int) -> None:
    """9 names push the SAN past 127 bytes (long-form length), 40 past 255 and the TBS
    past 1 KiB."""
    intermediate = _intermediate(KeyAlgorithm.P256)
    key = generate_private_key(KeyAlgorithm.P256).public_key()
    names = tuple(f"service-{i}.namespace-{i}.svc.cluster.local" for i in range(count))
    args = (key, random_serial(), NOW, NOW + dt.timedelta(hours=1), names)
    ours = _template_leaf(intermediate, *args)
    assert ours.tbs_certificate_bytes == _builder_leaf(intermediate, *args).tbs_certificate_bytes
    san = ours.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(names)


def test_times_from_2050_are_generalized_time_as_rfc_5280_asks() -> None:
    intermediate = _intermediate(KeyAlgorithm.P256)
    key = generate_private_key(KeyAlgorithm.P256).public_key()
    start = dt.datetime(2049, 12, 31, 23, 30, tzinfo=dt.UTC)
    args = (key, random_serial(), start, start + dt.timedelta(hours=1), ())
    ours = _template_leaf(intermediate, *args)
    assert ours.tbs_certificate_bytes == _builder_leaf(intermediate, *args).tbs_certificate_bytes
    assert b"\x18\x0f20500101003000Z" in ours.tbs_certificate_bytes
    assert b"\x17\x0d491231233000Z" in ours.tbs_certificate_bytes


def test_issued_svid_keeps_the_profile_and_loses_microseconds() -> None:
    intermediate = _intermediate(KeyAlgorithm.P256)
    key = generate_private_key(KeyAlgorithm.P256)
    svid = intermediate.issue_x509_svid(
        SPIFFE_ID, key.public_key(), now=NOW, ttl=dt.timedelta(minutes=30), private_key=key
    )
    assert check_leaf(svid.leaf) == SpiffeId(SPIFFE_ID)
    assert svid.leaf.not_valid_after_utc == (NOW + dt.timedelta(minutes=30)).replace(microsecond=0)
    assert svid.leaf.not_valid_before_utc == (NOW - dt.timedelta(seconds=30)).replace(microsecond=0)
    serials = {
        intermediate.issue_x509_svid(SPIFFE_ID, key.public_key(), now=NOW).leaf.serial_number
        for _ in range(20)
    }
    assert len(serials) == 20


def test_openssl_verifies_a_template_leaf(tmp_path: object) -> None:
    from pathlib import Path

    directory = Path(str(tmp_path))
    root = RootAuthority.create(TrustDomain("example.org"), now=dt.datetime.now(dt.UTC))
    intermediate = root.issue_intermediate("east", now=dt.datetime.now(dt.UTC))
    key = generate_private_key(KeyAlgorithm.P256)
    svid = intermediate.issue_x509_svid(
        SPIFFE_ID, key.public_key(), now=dt.datetime.now(dt.UTC), dns_names=("web.example",)
    )
    (directory / "root.pem").write_bytes(root.certificate.public_bytes(Encoding.PEM))
    (directory / "chain.pem").write_bytes(intermediate.certificate.public_bytes(Encoding.PEM))
    (directory / "leaf.pem").write_bytes(svid.leaf.public_bytes(Encoding.PEM))
    result = subprocess.run(
        [
            "openssl", "verify", "-x509_strict", "-purpose", "sslclient",
            "-CAfile", str(directory / "root.pem"),
            "-untrusted", str(directory / "chain.pem"),
            str(directory / "leaf.pem"),
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_non_ascii_dns_name_is_an_issuance_error_not_a_crash() -> None:
    intermediate = _intermediate(KeyAlgorithm.P256)
    key = generate_private_key(KeyAlgorithm.P256).public_key()
    with pytest.raises(IssuanceError) as caught:
        intermediate.issue_x509_svid(SPIFFE_ID, key, now=NOW, dns_names=("bücher.example",))
    assert caught.value.reason == "bad-dns-name"


def test_der_helpers_encode_and_refuse_malformed_input() -> None:
    assert der_length(5) == b"\x05"
    assert der_length(200) == b"\x81\xc8"
    assert der_length(70000) == b"\x83\x01\x11\x70"
    assert der_tlv(0x04, b"x" * 300)[:4] == b"\x04\x82\x01\x2c"
    assert der_oid(x509.ObjectIdentifier("1.2.840.10045.4.3.2")) == bytes.fromhex(
        "06082a8648ce3d040302"
    )
    assert read_tlv(b"\x30\x03\x02\x01\x05", 0) == (0x30, 2, 5)
    assert read_tlv(b"\x30\x81\x80" + b"\x00" * 128, 0) == (0x30, 3, 131)
    for bad in (b"\x30", b"\x30\x05\x00", b"\x30\x85\x00\x00\x00\x00\x01", b"\x30\x80"):
        with pytest.raises(ValueError):
            read_tlv(bad, 0)


def test_a_template_cannot_be_made_for_an_unknown_key_kind() -> None:
    with pytest.raises(TypeError):
        LeafTemplate(
            key=object(),  # type: ignore[arg-type]
            issuer=_LEAF_SUBJECT,
            subject=_LEAF_SUBJECT,
            extensions=(),
        )
