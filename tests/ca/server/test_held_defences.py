"""Defences of the CA's agent-facing gRPC that an adversarial probe found holding, kept
holding: over real gRPC mutual TLS on 127.0.0.1, server in-process.

What ``test_server.py`` already proves is not repeated (a workload SVID presented as an
agent's, entries of another node, a CSR for another ID, rate limits; bans are in
``test_bans.py``). Here: a client with no certificate, or one from an impostor CA, never
gets a call through; and a CSR that asks for more than an SVID is signed as a plain SVID.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca import RootAuthority, TrustDomain, verify_x509_svid
from ca.api._proto import ca_pb2
from ca.api.client import DEFAULT_SERVER_NAME, CaError
from ca.api.convert import SERVICE
from ca.server.app import CaServer
from ca.server.attestation import agent_spiffe_id

from .conftest import attested, client_for, run, server_config, serving

REJECTED = "trellis_ca_requests_rejected_total"
WEB = "spiffe://example.org/ns/default/sa/web"


def _rejected_total(server: CaServer) -> float:
    return sum(
        sample.value
        for metric in server.metrics.registry.collect()
        for sample in metric.samples
        if sample.name == REJECTED
    )


def test_a_client_without_a_certificate_is_refused_by_the_mutual_tls_listener_before_any_call(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> tuple[grpc.StatusCode, float, int]:
        async with serving(server_config(ca_dir, entries_file)) as server:
            roots = server.store.root_cert_path.read_bytes()
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
            options = [("grpc.ssl_target_name_override", DEFAULT_SERVER_NAME)]
            async with grpc.aio.secure_channel(
                server.addresses["listen"], credentials, options
            ) as channel:
                fetch = channel.unary_unary(
                    f"/{SERVICE}/FetchEntries",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=ca_pb2.FetchEntriesResponse.FromString,
                )
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await fetch(ca_pb2.FetchEntriesRequest(), timeout=10)
            # The TLS handshake itself failed: no handler ran, so nothing was counted.
            counted = _rejected_total(server)
            agent = await attested(server, "node-a")
            served = len(await agent.fetch_entries())
            await agent.close()
            return refused.value.code(), counted, served

    code, counted, served = run(scenario())
    assert code == grpc.StatusCode.UNAVAILABLE
    assert counted == 0
    assert served == 2  # web (node-a) and everywhere


def test_an_agent_svid_minted_by_an_impostor_ca_for_the_same_trust_domain_is_refused(
    ca_dir: Path, entries_file: Path
) -> None:
    """The impostor's root names the same trust domain and its leaf the genuine agent ID of
    node-a: only the chain to this CA's root decides."""
    now = dt.datetime.now(dt.UTC)
    impostor = RootAuthority.create(TrustDomain("example.org"), now=now).issue_intermediate(
        "west", now=now
    )
    key = ec.generate_private_key(ec.SECP256R1())
    forged = impostor.issue_x509_svid(
        agent_spiffe_id(TrustDomain("example.org"), "node-a"),
        key.public_key(),
        now=now,
        private_key=key,
    )

    async def scenario() -> tuple[str, str, int]:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = client_for(server, agent_svid=forged)
            with pytest.raises(CaError) as entries:
                await client.fetch_entries()
            with pytest.raises(CaError) as signing:
                await client.new_jwt_svid("web", ["db"])
            await client.close()
            genuine = await attested(server, "node-a")
            served = len(await genuine.fetch_entries())
            await genuine.close()
            return entries.value.code, signing.value.code, served

    entries_code, signing_code, served = run(scenario())
    assert entries_code == signing_code == "UNAVAILABLE"  # the handshake is refused
    assert served == 2


def _greedy_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR for web asking for everything an SVID must not carry: CA:true, certificate
    signing, code signing, and SANs beyond its one SPIFFE ID."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Evil Issuing CA")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.OCSP_SIGNING]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(WEB),
                    x509.DNSName("trellis-ca"),
                    x509.DNSName("*.example.org"),
                    x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                    x509.RFC822Name("admin@example.org"),
                ]
            ),
            critical=False,
        )
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_a_csr_asking_for_ca_true_and_extra_sans_is_signed_as_a_plain_svid(
    ca_dir: Path, entries_file: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())

    async def scenario() -> tuple[list[x509.Certificate], list[x509.Certificate]]:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            (svid,) = await client.batch_sign_csrs([("web", _greedy_csr(key))])
            await client.close()
            return list(svid.chain), list(server.bundles.current.x509_authorities)

    chain, roots = run(scenario())
    leaf = chain[0]
    extensions = leaf.extensions
    assert extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not (
        usage.value.key_cert_sign
        or usage.value.crl_sign
        or usage.value.content_commitment
        or usage.value.key_encipherment
    )
    assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    # Only the entry's own DNS name, never the CA's name or a wildcard from the CSR.
    assert san.get_values_for_type(x509.DNSName) == ["web.default.svc"]
    assert san.get_values_for_type(x509.IPAddress) == []
    assert san.get_values_for_type(x509.RFC822Name) == []
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    assert leaf.public_key() == key.public_key()
    verified = verify_x509_svid(
        chain, {TrustDomain("example.org"): roots}, now=dt.datetime.now(dt.UTC)
    )
    assert str(verified.spiffe_id) == WEB
