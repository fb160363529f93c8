"""X509-SVID and JWT-SVID issuance rate on one core, against a bare-cryptography floor.

Prints JSON. The floor does, for the same CSR, only what any issuer must: parse the CSR,
check its signature and sign an equivalent leaf (same extensions) with a bare
``CertificateBuilder``. Trellis builds leaves from a DER template instead (``ca.leafder``),
so a ratio above 1 says the template saves more than Trellis's checks and bookkeeping cost.

The same run measures a post-quantum trust domain beside it: an ML-DSA-65 intermediate
(FIPS 204) signing leaves for ML-DSA-65 workload CSRs, against the same kind of floor, and
the ratio of its rate to the ECDSA one.

    python bench/ca_issuance.py [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import cryptography
from cryptography import x509
from cryptography.hazmat.backends.openssl.backend import backend
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca import (
    IntermediateAuthority,
    JwtAuthority,
    KeyAlgorithm,
    RootAuthority,
    SpiffeId,
    TrustDomain,
    generate_private_key,
)
from ca.keys import PrivateKey

WEB = "spiffe://example.org/ns/default/sa/web"


def rate(fn: Callable[[], object], seconds: float) -> float:
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        count += 50
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def _csr_pem(key: PrivateKey) -> bytes:
    algorithm = hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey) else None
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WEB)]), critical=False
        )
        .sign(key, algorithm)
        .public_bytes(serialization.Encoding.PEM)
    )


def _floor(inter: IntermediateAuthority, csr_pem: bytes, now: dt.datetime) -> Callable[[], None]:
    """Parse and check the CSR, sign the same leaf with a bare CertificateBuilder."""
    issuer_name = inter.certificate.subject
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(inter.certificate.public_key())  # type: ignore[arg-type]
    ku = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Trellis")])
    signing_key = inter.private_key
    # ECDSA signs a SHA-256 digest; ML-DSA signs the TBSCertificate itself (RFC 9881).
    digest = hashes.SHA256() if isinstance(signing_key, ec.EllipticCurvePrivateKey) else None

    def floor() -> None:
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        public = csr.public_key()
        (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(ku, critical=True)
            .add_extension(eku, critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(WEB)]), critical=False
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)  # type: ignore[arg-type]
            .add_extension(aki, critical=False)
            .sign(signing_key, digest)  # type: ignore[arg-type]
        )

    return floor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says

    now = dt.datetime.now(dt.UTC)
    root = RootAuthority.create(TrustDomain("example.org"), now=now)
    inter = root.issue_intermediate("bench", now=now)
    pq_root = RootAuthority.create(
        TrustDomain("example.org"), now=now, key_algorithm=KeyAlgorithm.MLDSA65
    )
    pq_inter = pq_root.issue_intermediate("bench", now=now, key_algorithm=KeyAlgorithm.MLDSA65)
    jwt = JwtAuthority.generate()
    csr_pem = _csr_pem(ec.generate_private_key(ec.SECP256R1()))
    pq_csr_pem = _csr_pem(generate_private_key(KeyAlgorithm.MLDSA65))
    spiffe_id = SpiffeId(WEB)
    floor = _floor(inter, csr_pem, now)
    pq_floor = _floor(pq_inter, pq_csr_pem, now)

    def trellis_x509() -> None:
        inter.issue_x509_svid_from_csr(csr_pem, spiffe_id, now=now)

    def trellis_mldsa65() -> None:
        pq_inter.issue_x509_svid_from_csr(pq_csr_pem, spiffe_id, now=now)

    def trellis_jwt() -> None:
        jwt.sign(spiffe_id, ["db"], now=now)

    runs = {
        "floor": floor,
        "x509": trellis_x509,
        "jwt": trellis_jwt,
        "mldsa65_floor": pq_floor,
        "mldsa65": trellis_mldsa65,
    }
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved so drift hits every side alike
        for name, fn in runs.items():
            results[name].append(rate(fn, args.seconds))
    best = {k: max(v) for k, v in results.items()}
    median = {k: statistics.median(v) for k, v in results.items()}
    print(
        json.dumps(
            {
                "benchmark": "ca_issuance",
                "cores": 1,
                "seconds_per_round": args.seconds,
                "rounds": args.rounds,
                "x509_svids_per_second": round(median["x509"]),
                "jwt_svids_per_second": round(median["jwt"]),
                "floor_csr_check_and_sign_per_second": round(median["floor"]),
                "ratio_x509_to_floor": round(median["x509"] / median["floor"], 3),
                "mldsa65_x509_svids_per_second": round(median["mldsa65"]),
                "mldsa65_floor_per_second": round(median["mldsa65_floor"]),
                "ratio_mldsa65_to_floor": round(median["mldsa65"] / median["mldsa65_floor"], 3),
                "ratio_mldsa65_to_ecdsa": round(median["mldsa65"] / median["x509"], 3),
                "best": {k: round(v) for k, v in best.items()},
                "target": {"ratio": 0.8, "x509_svids_per_second": 8000},
                "env": {
                    "python": platform.python_version(),
                    "cryptography": cryptography.__version__,
                    "openssl": backend.openssl_version_text(),
                    "cpu": platform.processor() or platform.machine(),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
