"""ML-DSA (FIPS 204) in roots, intermediates and leaves: the RFC 9881 profile, mixed
hierarchies, path validation that refuses what it must, and refusals in words."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from ca import IntermediateAuthority, KeyAlgorithm, RootAuthority, TrustDomain
from ca.authority import IssuanceError, load_csr
from ca.bundle import TrustBundle
from ca.keys import KeyMaterialError, generate_private_key, key_algorithm_of
from ca.leafder import der_oid, der_tlv, read_tlv
from ca.verify import VerificationError, verify_x509_svid
from ca.x509svid import SIGNING_KEY_USAGE
from tests.ca.test_cli import refuse, trellis

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
TD = TrustDomain("example.org")
WEB = "spiffe://example.org/ns/default/sa/web"
MLDSA = (KeyAlgorithm.MLDSA44, KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA87)
# RFC 9881 §3: id-ml-dsa-44/65/87, 2.16.840.1.101.3.4.3.17/18/19.
OIDS = {
    KeyAlgorithm.MLDSA44: SignatureAlgorithmOID.ML_DSA_44,
    KeyAlgorithm.MLDSA65: SignatureAlgorithmOID.ML_DSA_65,
    KeyAlgorithm.MLDSA87: SignatureAlgorithmOID.ML_DSA_87,
}


def hierarchy(
    root_key: KeyAlgorithm, intermediate_key: KeyAlgorithm, now: dt.datetime = NOW
) -> tuple[RootAuthority, IntermediateAuthority]:
    root = RootAuthority.create(TD, now=now, key_algorithm=root_key)
    return root, root.issue_intermediate("west", now=now, key_algorithm=intermediate_key)


def signature_algorithm_der(cert: x509.Certificate) -> bytes:
    """The outer signatureAlgorithm element of a certificate's DER."""
    der = cert.public_bytes(Encoding.DER)
    _, start, _ = read_tlv(der, 0)
    _, _, tbs_end = read_tlv(der, start)
    _, _, end = read_tlv(der, tbs_end)
    return der[tbs_end:end]


@pytest.mark.parametrize("algorithm", MLDSA, ids=lambda a: a.value)
def test_every_mldsa_parameter_set_signs_a_hierarchy_to_the_rfc_9881_profile(
    algorithm: KeyAlgorithm,
) -> None:
    root, intermediate = hierarchy(algorithm, algorithm)
    key = generate_private_key(algorithm)
    svid = intermediate.issue_x509_svid(WEB, key.public_key(), now=NOW)
    for cert in (root.certificate, intermediate.certificate, svid.leaf):
        assert cert.signature_algorithm_oid == OIDS[algorithm]
        # Parameters absent: the AlgorithmIdentifier is the OID alone, no NULL.
        assert signature_algorithm_der(cert) == der_tlv(0x30, der_oid(OIDS[algorithm]))
        assert key_algorithm_of(cert.public_key()) is algorithm
    leaf_ku = svid.leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert leaf_ku.critical and leaf_ku.value.digital_signature
    assert not (leaf_ku.value.key_encipherment or leaf_ku.value.key_cert_sign)
    for ca in (root.certificate, intermediate.certificate):
        assert ca.extensions.get_extension_for_class(x509.KeyUsage).value == SIGNING_KEY_USAGE
    verified = verify_x509_svid(svid.chain, {TD: [root.certificate]}, now=NOW)
    assert str(verified.spiffe_id) == WEB


@pytest.mark.parametrize(
    ("root_key", "intermediate_key", "leaf_key"),
    [
        (KeyAlgorithm.P384, KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65),
        (KeyAlgorithm.MLDSA65, KeyAlgorithm.P256, KeyAlgorithm.P256),
        (KeyAlgorithm.MLDSA87, KeyAlgorithm.MLDSA44, KeyAlgorithm.P256),
    ],
    ids=["ecdsa-root-mldsa-below", "mldsa-root-ecdsa-below", "mldsa87-root-mldsa44-ca"],
)
def test_mixed_hierarchies_issue_and_verify_in_both_directions(
    root_key: KeyAlgorithm, intermediate_key: KeyAlgorithm, leaf_key: KeyAlgorithm
) -> None:
    root, intermediate = hierarchy(root_key, intermediate_key)
    svid = intermediate.issue_x509_svid(WEB, generate_private_key(leaf_key).public_key(), now=NOW)
    assert verify_x509_svid(svid.chain, {TD: [root.certificate]}, now=NOW).path[-1] == (
        root.certificate
    )


@pytest.mark.parametrize("algorithm", MLDSA, ids=lambda a: a.value)
def test_the_leaf_template_signs_what_the_certificate_builder_would(
    algorithm: KeyAlgorithm,
) -> None:
    _, intermediate = hierarchy(KeyAlgorithm.P384, algorithm)
    public = generate_private_key(KeyAlgorithm.P256).public_key()
    leaf = intermediate.issue_x509_svid(WEB, public, now=NOW).leaf
    builder = x509.CertificateBuilder(
        issuer_name=leaf.issuer,
        subject_name=leaf.subject,
        public_key=public,
        serial_number=leaf.serial_number,
        not_valid_before=leaf.not_valid_before_utc,
        not_valid_after=leaf.not_valid_after_utc,
        extensions=list(leaf.extensions),
    )
    reference = builder.sign(intermediate.private_key, None)
    assert leaf.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert signature_algorithm_der(leaf) == signature_algorithm_der(reference)


# digitalSignature alone: what a leaf has, and a CA must not (no keyCertSign).
SIGNER_ONLY = x509.KeyUsage(True, False, False, False, False, False, False, False, False)


def tampered(cert: x509.Certificate) -> x509.Certificate:
    der = bytearray(cert.public_bytes(Encoding.DER))
    der[-100] ^= 0x01  # inside the ML-DSA signature, the last element
    return x509.load_der_x509_certificate(bytes(der))


def test_a_tampered_mldsa_signature_is_refused_on_the_leaf_and_the_intermediate() -> None:
    root, intermediate = hierarchy(KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65)
    svid = intermediate.issue_x509_svid(
        WEB, generate_private_key(KeyAlgorithm.MLDSA65).public_key(), now=NOW
    )
    roots = {TD: [root.certificate]}
    for chain in (
        [tampered(svid.leaf), intermediate.certificate],
        [svid.leaf, tampered(intermediate.certificate)],
    ):
        with pytest.raises(VerificationError) as info:
            verify_x509_svid(chain, roots, now=NOW)
        assert info.value.reason == "unknown-ca"


def mldsa_ca_with(
    ku: x509.KeyUsage, root: RootAuthority, now: dt.datetime = NOW
) -> IntermediateAuthority:
    """An ML-DSA-65 intermediate under ``root`` with Key Usage ``ku``, else as Trellis's."""
    key = mldsa.MLDSA65PrivateKey.generate()
    root_ski = root.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wrong usage")]))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(TD.id_string())]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski.value),
            critical=False,
        )
        .sign(root.private_key, None)
    )
    return IntermediateAuthority.load(cert, key, "west")


def test_an_mldsa_intermediate_without_key_cert_sign_is_refused() -> None:
    root = RootAuthority.create(TD, now=NOW, key_algorithm=KeyAlgorithm.MLDSA65)
    wrong = mldsa_ca_with(SIGNER_ONLY, root)
    svid = wrong.issue_x509_svid(
        WEB, generate_private_key(KeyAlgorithm.MLDSA65).public_key(), now=NOW
    )
    with pytest.raises(VerificationError) as info:
        verify_x509_svid(svid.chain, {TD: [root.certificate]}, now=NOW)
    assert info.value.reason == "signing-cert-without-key-cert-sign"


def test_an_mldsa_leaf_whose_key_usage_allows_key_encipherment_is_refused() -> None:
    """RFC 9881 §5: ML-DSA keys sign; keyEncipherment is a usage no ML-DSA key can have."""
    root, intermediate = hierarchy(KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65)
    public = generate_private_key(KeyAlgorithm.MLDSA65).public_key()
    good = intermediate.issue_x509_svid(WEB, public, now=NOW).leaf
    extensions = [
        x509.KeyUsage(True, False, True, False, False, False, False, False, False)
        if isinstance(e.value, x509.KeyUsage)
        else e.value
        for e in good.extensions
    ]
    builder = x509.CertificateBuilder(
        issuer_name=good.issuer,
        subject_name=good.subject,
        public_key=public,
        serial_number=good.serial_number,
        not_valid_before=good.not_valid_before_utc,
        not_valid_after=good.not_valid_after_utc,
    )
    for extension, original in zip(extensions, good.extensions, strict=True):
        builder = builder.add_extension(extension, critical=original.critical)
    leaf = builder.sign(intermediate.private_key, None)
    with pytest.raises(VerificationError) as info:
        verify_x509_svid([leaf, intermediate.certificate], {TD: [root.certificate]}, now=NOW)
    assert info.value.reason == "mldsa-key-encipherment"


def _elements(der: bytes) -> list[bytes]:
    """The DER elements inside the SEQUENCE ``der``, each with its tag and length."""
    _, offset, end = read_tlv(der, 0)
    parts = []
    while offset < end:
        _, _, next_offset = read_tlv(der, offset)
        parts.append(der[offset:next_offset])
        offset = next_offset
    return parts


def _csr_with_spki_oid(actual: KeyAlgorithm, claimed: KeyAlgorithm, parameters: bool) -> bytes:
    """A CSR for an ``actual`` key whose SPKI names ``claimed`` (with a NULL if asked),
    re-encoded so every enclosing length is right: only the key is wrong."""
    key = generate_private_key(actual)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, None)
    info, signature_algorithm, signature = _elements(csr.public_bytes(Encoding.DER))
    version, subject, spki, *attributes = _elements(info)
    _, bits = _elements(spki)
    algorithm = der_tlv(0x30, der_oid(OIDS[claimed]) + (b"\x05\x00" if parameters else b""))
    info = der_tlv(0x30, b"".join([version, subject, der_tlv(0x30, algorithm + bits), *attributes]))
    return der_tlv(0x30, info + signature_algorithm + signature)


@pytest.mark.parametrize(
    ("actual", "claimed", "parameters", "expected"),
    [
        (KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA44, False, "ML-DSA-44 public key is 1952 bytes"),
        (KeyAlgorithm.MLDSA44, KeyAlgorithm.MLDSA87, False, "ML-DSA-87 public key is 1312 bytes"),
        (KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65, True, "RFC 9881 requires them absent"),
    ],
    ids=["65-key-as-44", "44-key-as-87", "null-parameters"],
)
def test_a_csr_with_an_mldsa_key_of_the_wrong_size_or_params_is_refused_in_words(
    actual: KeyAlgorithm, claimed: KeyAlgorithm, parameters: bool, expected: str
) -> None:
    _, intermediate = hierarchy(KeyAlgorithm.P384, KeyAlgorithm.MLDSA65)
    der = _csr_with_spki_oid(actual, claimed, parameters)
    with pytest.raises(IssuanceError) as info:
        intermediate.issue_x509_svid_from_csr(load_csr(der), WEB, now=NOW)
    assert info.value.reason == "unsupported-key"
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_the_cli_refuses_a_pem_csr_with_a_wrong_mldsa_key_in_one_line(tmp_path: Path) -> None:
    ca_dir, csr_path = tmp_path / "ca", tmp_path / "bad.csr"
    init = ["ca", "init", "--trust-domain", "example.org", "--dir", str(ca_dir)]
    assert trellis(*init, "--key-type", "mldsa65").returncode == 0
    west = ["--dir", str(ca_dir), "--cluster", "west"]
    assert trellis("ca", "intermediate", *west, "--key-type", "mldsa65").returncode == 0
    der = _csr_with_spki_oid(KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65, parameters=True)
    body = base64.encodebytes(der).decode()
    csr_path.write_text(
        f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    )
    out = tmp_path / "out"
    result = trellis(
        "ca", "issue", *west, "--spiffe-id", WEB, "--out", str(out), "--csr", str(csr_path)
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "trellis: error: CSR's ML-DSA-65 key has algorithm parameters;"
        " RFC 9881 requires them absent"
    ]
    assert not out.exists()


def test_a_bundle_carries_mldsa_authorities_as_akp_jwks_and_reads_them_back() -> None:
    root, _ = hierarchy(KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65)
    bundle = TrustBundle(TD, (root.certificate,))
    doc = json.loads(bundle.to_json())
    (entry,) = doc["keys"]
    assert (entry["kty"], entry["alg"], entry["use"]) == ("AKP", "ML-DSA-65", "x509-svid")
    assert TrustBundle.from_json(TD, bundle.to_json()).x509_authorities == (root.certificate,)


def test_rsa_roots_are_still_refused_and_name_what_is_accepted() -> None:
    with pytest.raises(KeyMaterialError, match="ML-DSA-44/65/87"):
        RootAuthority.create(TD, now=NOW, key_algorithm=KeyAlgorithm.RSA2048)


def test_the_cli_builds_an_mldsa_trust_domain_as_real_processes(tmp_path: Path) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "out"
    init = ["ca", "init", "--trust-domain", "example.org", "--dir", str(ca_dir)]
    west = ["--dir", str(ca_dir), "--cluster", "west"]
    steps = [
        [*init, "--key-type", "mldsa87"],
        ["ca", "intermediate", *west, "--key-type", "ML-DSA-65"],
        ["ca", "issue", *west, "--spiffe-id", WEB, "--out", str(out), "--key-type", "mldsa44"],
        ["ca", "inspect", str(out / "svid.pem"), "--bundle", str(out / "bundle.pem"), "--json"],
    ]
    results = [trellis(*step) for step in steps]
    for result in results:
        assert result.returncode == 0, result.stderr
    (report,) = json.loads(results[-1].stdout)
    assert [c["key"] for c in report["certificates"]] == ["ML-DSA-44", "ML-DSA-65"]
    assert report["chain"]["verified"] is True
    root = x509.load_pem_x509_certificate((ca_dir / "root.crt").read_bytes())
    assert root.signature_algorithm_oid == SignatureAlgorithmOID.ML_DSA_87


@pytest.mark.parametrize("command", ["init", "intermediate", "issue"])
def test_an_unknown_key_type_is_refused_naming_the_choices(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = {
        "init": ["ca", "init", "--trust-domain", "example.org", "--dir", str(tmp_path)],
        "intermediate": ["ca", "intermediate", "--dir", str(tmp_path), "--cluster", "west"],
        "issue": ["ca", "issue", "--dir", str(tmp_path), "--cluster", "west",
                  "--spiffe-id", WEB, "--out", str(tmp_path / "o")],
    }[command]  # fmt: skip
    refuse([*args, "--key-type", "mldsa99"], capsys, "mldsa44, mldsa65, mldsa87", code=2)
    assert not list(tmp_path.iterdir())


def test_a_csr_for_an_ecdsa_key_still_issues_from_an_mldsa_intermediate() -> None:
    _, intermediate = hierarchy(KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    svid = intermediate.issue_x509_svid_from_csr(csr, WEB, now=NOW)
    assert svid.leaf.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("command", [["agent"], ["ca", "serve"]], ids=["agent", "ca-serve"])
def test_an_unknown_workload_key_type_is_refused_naming_the_choices(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    refuse([*command, "--workload-key-type", "dilithium3"], capsys, "mldsa65", code=2)
