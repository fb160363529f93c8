"""ML-DSA (FIPS 204) in TLS 1.3: the mldsa44/65/87 schemes of draft-ietf-tls-mldsa.

In-memory engine pairs for negotiation and certificate selection; a real loopback socket
between the asyncio shells for the refusals, where the attacker is our own client with
its CertificateVerify replaced (the only way to produce a well-formed handshake that
carries exactly one bad field).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509

import sidecar.tls.client as client_module
from sidecar.tls import (
    AlertDescription,
    ClientConnection,
    HandshakeComplete,
    PeerCertificate,
    ServerConnection,
    SignatureScheme,
    TLSConfig,
    TLSError,
)
from sidecar.tls.credentials import Credential
from sidecar.tls.shell import PeerAlertError, open_tls_connection
from sidecar.tls.signatures import schemes_for_key

from .helpers import connected_pair, drain, feed, pump
from .pki import (
    NOW,
    TRUST_DOMAIN,
    Identity,
    client_config,
    identity,
    live_identity,
    mixed_authority,
    mldsa_identity,
    server_config,
)
from .test_interop_system_fixtures import run, tls_echo_server

S = SignatureScheme
ECDSA_ONLY = (S.ecdsa_secp256r1_sha256,)


def _completed(events: list[object]) -> HandshakeComplete:
    done = [e for e in events if isinstance(e, HandshakeComplete)]
    assert len(done) == 1, events
    return done[0]


def _bundles(*idents: Identity) -> dict[str, list[x509.Certificate]]:
    return {TRUST_DOMAIN: [ident.root for ident in idents]}


def _peer_chain(events: list[object]) -> tuple[x509.Certificate, ...]:
    chains = [e.chain for e in events if isinstance(e, PeerCertificate)]
    assert len(chains) == 1, events
    return tuple(chains[0])


@pytest.mark.parametrize(
    ("kind", "scheme"),
    [("mldsa44", S.mldsa44), ("mldsa65", S.mldsa65), ("mldsa87", S.mldsa87)],
)
def test_mldsa_chains_authenticate_both_sides_with_the_mldsa_scheme(
    kind: str, scheme: SignatureScheme
) -> None:
    server_ident = mldsa_identity("server", kind)
    client_ident = mldsa_identity("client", kind)
    client, server = connected_pair(client_config(client_ident), server_config(server_ident))
    # Each side reports the scheme of the *peer's* CertificateVerify.
    assert _completed(drain(client)).signature_scheme == scheme
    assert _completed(drain(server)).signature_scheme == scheme


def test_an_ecdsa_root_over_mldsa_intermediate_and_leaf_verifies() -> None:
    authority = mixed_authority("p256", "mldsa65")
    server_ident = authority.leaf(key_kind="mldsa65")
    # The client trusts the P-256 root; the chain under it is ML-DSA-65 throughout.
    client_cfg = client_config(trust_bundles=_bundles(identity("client"), server_ident))
    server_cfg = server_config(server_ident, trust_bundles=_bundles(identity("client")))
    client, _server = connected_pair(client_cfg, server_cfg)
    assert _completed(drain(client)).signature_scheme == S.mldsa65


def _dual_server(first: Identity, second: Identity, **overrides: Any) -> TLSConfig:
    clients = identity("client")
    return server_config(
        first,
        credentials=(Credential(second.chain, second.key),),
        trust_bundles=_bundles(clients, first, second),
        **overrides,
    )


def test_a_server_holding_both_serves_a_classical_client_its_ecdsa_chain() -> None:
    pq, classical = mldsa_identity("server"), identity("server")
    client_cfg = client_config(
        signature_schemes=ECDSA_ONLY,
        certificate_signature_schemes=ECDSA_ONLY,
        trust_bundles=_bundles(classical),
    )
    client, _server = connected_pair(client_cfg, _dual_server(pq, classical))
    assert _completed(drain(client)).signature_scheme == S.ecdsa_secp256r1_sha256


def test_a_server_holding_both_serves_a_post_quantum_client_its_mldsa_chain() -> None:
    pq, classical = mldsa_identity("server"), identity("server")
    client_cfg = client_config(trust_bundles=_bundles(pq, classical))
    client, _server = connected_pair(client_cfg, _dual_server(pq, classical))
    assert _completed(drain(client)).signature_scheme == S.mldsa65


def test_signature_algorithms_cert_steers_the_server_away_from_an_mldsa_signed_chain() -> None:
    # The leaf key is P-256 in both chains; only the intermediate's signature differs:
    # ML-DSA-65 (from an ML-DSA root) in the first, ECDSA in the second.
    mldsa_signed = mixed_authority("mldsa65", "mldsa65").leaf(key_kind="p256")
    classical = identity("server")
    client_cfg = client_config(
        certificate_signature_schemes=ECDSA_ONLY,
        trust_bundles=_bundles(mldsa_signed, classical),
    )
    client, _server = connected_pair(client_cfg, _dual_server(mldsa_signed, classical))
    assert _peer_chain(drain(client)) == classical.chain


def test_a_server_with_only_an_mldsa_chain_refuses_a_classical_client_with_handshake_failure() -> (
    None
):
    client = ClientConnection(
        client_config(signature_schemes=ECDSA_ONLY, certificate_signature_schemes=ECDSA_ONLY),
        now=NOW,
    )
    server = ServerConnection(server_config(mldsa_identity("server")), now=NOW)
    # RFC 8446 §4.4.2.2: no certificate whose key can sign with an offered scheme.
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == AlertDescription.handshake_failure


def test_the_client_answers_a_certificate_request_with_the_chain_the_server_can_verify() -> None:
    pq_client, classical_client = mldsa_identity("client"), identity("client")
    client_cfg = client_config(
        pq_client,
        credentials=(Credential(classical_client.chain, classical_client.key),),
        trust_bundles=_bundles(identity("server")),
    )
    server_cfg = server_config(
        signature_schemes=ECDSA_ONLY,
        trust_bundles=_bundles(pq_client, classical_client),
    )
    _client, server = connected_pair(client_cfg, server_cfg)
    assert _completed(drain(server)).signature_scheme == S.ecdsa_secp256r1_sha256


def test_a_client_with_no_fitting_chain_sends_none_and_gets_certificate_required() -> None:
    pq_client = mldsa_identity("client")
    client = ClientConnection(
        client_config(pq_client, trust_bundles=_bundles(identity("server"))), now=NOW
    )
    server = ServerConnection(
        server_config(signature_schemes=ECDSA_ONLY, trust_bundles=_bundles(pq_client)), now=NOW
    )
    # RFC 8446 §4.4.2.3: an empty Certificate; §4.4.2.4: the server requires one.
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == AlertDescription.certificate_required


def test_a_client_refuses_an_mldsa_signed_chain_its_signature_algorithms_cert_left_out() -> None:
    # The server has nothing else, so it sends the chain anyway (RFC 8446 §4.4.2.2 lets
    # the client decide); the client holds the chain to its signature_algorithms_cert.
    server_ident = mixed_authority("mldsa65", "mldsa65").leaf(key_kind="p256")
    client = ClientConnection(
        client_config(
            certificate_signature_schemes=ECDSA_ONLY, trust_bundles=_bundles(server_ident)
        ),
        now=NOW,
    )
    server = ServerConnection(server_config(server_ident), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == AlertDescription.bad_certificate


def test_an_mldsa65_handshake_completes_when_fed_one_byte_at_a_time() -> None:
    # ML-DSA-65 flights are ~16 KB: a Certificate spans records, a CertificateVerify of
    # 3309 bytes may be split anywhere.
    client = ClientConnection(client_config(mldsa_identity("client")), now=NOW)
    server = ServerConnection(server_config(mldsa_identity("server")), now=NOW)
    for _ in range(4):
        to_server = client.data_to_send()
        feed(server, to_server, bytewise=True)
        to_client = server.data_to_send()
        feed(client, to_client, bytewise=True)
        if not to_server and not to_client:
            break
    assert _completed(drain(client)).signature_scheme == S.mldsa65
    assert _completed(drain(server)).signature_scheme == S.mldsa65


# --- refusals over a real loopback socket -------------------------------------------


def _forged_certificate_verify(
    monkeypatch: pytest.MonkeyPatch, scheme: int, signature: Callable[[bytes], bytes]
) -> None:
    """Our client claims `scheme` in its CertificateVerify and sends `signature(real)`."""
    real_select = client_module.select_credential
    real_sign = client_module.sign

    def select(*args: Any) -> tuple[Credential, int] | None:
        chosen = real_select(*args)
        return None if chosen is None else (chosen[0], scheme)

    def sign(key: Any, _scheme: int, data: bytes) -> bytes:
        return signature(real_sign(key, schemes_for_key(key)[0], data))

    monkeypatch.setattr(client_module, "select_credential", select)
    monkeypatch.setattr(client_module, "sign", sign)


def _server_refusal(server_ident: Identity, client_ident: Identity) -> tuple[object, list[object]]:
    server_cfg = server_config(server_ident, rng=os.urandom, trust_bundles=_bundles(client_ident))
    client_cfg = client_config(client_ident, rng=os.urandom, trust_bundles=_bundles(server_ident))

    async def scenario() -> tuple[object, list[object]]:
        async with tls_echo_server(server_cfg) as (port, seen):
            reader, writer = await open_tls_connection("127.0.0.1", port, config=client_cfg)
            # TLS 1.3: the client is done before the server judges its CertificateVerify.
            try:
                await asyncio.wait_for(reader.read(), 10)
                outcome: object = None
            except PeerAlertError as exc:
                outcome = exc
            writer.close()
            await asyncio.sleep(0.05)
        return outcome, seen

    return run(scenario())


def _assert_refused(outcome: object, seen: list[object], alert: AlertDescription) -> None:
    errors = [e for e in seen if isinstance(e, TLSError)]
    assert [e.alert for e in errors] == [alert], seen
    # The client read the same alert off the wire.
    assert isinstance(outcome, PeerAlertError) and outcome.alert == alert, outcome


def test_certificate_verify_claiming_mldsa65_with_an_ecdsa_leaf_is_illegal_parameter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _forged_certificate_verify(monkeypatch, S.mldsa65, lambda _real: os.urandom(3309))
    outcome, seen = _server_refusal(
        live_identity("server", "mldsa65"), live_identity("client", "p256")
    )
    # RFC 8446 §4.4.3: the scheme must fit the key in the sender's end-entity certificate.
    _assert_refused(outcome, seen, AlertDescription.illegal_parameter)


@pytest.mark.parametrize(
    "mangle",
    [lambda sig: sig[:-1], lambda sig: sig + b"\x00", lambda sig: sig[:64]],
    ids=["truncated-by-one", "one-byte-over", "ecdsa-sized"],
)
def test_an_mldsa65_signature_of_the_wrong_length_is_decrypt_error(
    monkeypatch: pytest.MonkeyPatch, mangle: Callable[[bytes], bytes]
) -> None:
    _forged_certificate_verify(monkeypatch, S.mldsa65, mangle)
    ident = live_identity("client", "mldsa65")
    outcome, seen = _server_refusal(live_identity("server", "mldsa65"), ident)
    # FIPS 204: an ML-DSA-65 signature is exactly 3309 bytes; any other is a bad signature.
    _assert_refused(outcome, seen, AlertDescription.decrypt_error)


def test_a_flipped_bit_in_an_mldsa65_signature_is_decrypt_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _forged_certificate_verify(
        monkeypatch, S.mldsa65, lambda sig: sig[:100] + bytes([sig[100] ^ 1]) + sig[101:]
    )
    outcome, seen = _server_refusal(
        live_identity("server", "mldsa65"), live_identity("client", "mldsa65")
    )
    _assert_refused(outcome, seen, AlertDescription.decrypt_error)
