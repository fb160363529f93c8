"""In-memory client <-> server pairs over every suite, group and feature."""

from __future__ import annotations

import datetime as dt

import pytest

from ca.spiffeid import SpiffeId
from sidecar.tls import (
    AlertDescription,
    AlertReceived,
    ApplicationData,
    CipherSuite,
    ClientConnection,
    ConnectionClosed,
    HandshakeComplete,
    KeyUpdated,
    LocalProtocolError,
    NamedGroup,
    PeerCertificate,
    ServerConnection,
    SignatureScheme,
    TLSError,
)

from .helpers import connected_pair, drain, pump
from .pki import (
    CLIENT_ID,
    NOW,
    SERVER_ID,
    DeterministicRng,
    authority,
    ca_issued,
    client_config,
    identity,
    server_config,
)


def _complete(events: list[object]) -> HandshakeComplete:
    done = [e for e in events if isinstance(e, HandshakeComplete)]
    assert len(done) == 1, events
    return done[0]


@pytest.mark.parametrize("suite", list(CipherSuite))
@pytest.mark.parametrize(
    "group",
    [
        NamedGroup.X25519MLKEM768,
        NamedGroup.x25519,
        NamedGroup.secp256r1,
        NamedGroup.SecP256r1MLKEM768,
    ],
)
def test_mutual_tls_handshake_succeeds_for_every_suite_and_group(
    suite: CipherSuite, group: NamedGroup
) -> None:
    client, server = connected_pair(
        client_config(cipher_suites=(suite,), groups=(group,), key_share_groups=(group,)),
        server_config(groups=(group, NamedGroup.x25519)),
    )
    c, s = _complete(drain(client)), _complete(drain(server))
    assert c.cipher_suite == s.cipher_suite == suite
    assert c.group == s.group == group
    assert c.peer_spiffe_id == SERVER_ID and s.peer_spiffe_id == CLIENT_ID
    assert c.alpn_protocol == s.alpn_protocol == "h2"
    client.send_application_data(b"ping")
    server.receive_data(client.data_to_send())
    assert [e for e in drain(server) if isinstance(e, ApplicationData)] == [
        ApplicationData(b"ping")
    ]


def test_default_configs_negotiate_the_hybrid_group_without_retry() -> None:
    client, _server = connected_pair()
    c = _complete(drain(client))
    assert c.group == NamedGroup.X25519MLKEM768
    assert c.cipher_suite == CipherSuite.AES_128_GCM_SHA256


@pytest.mark.parametrize("kind", ["p256", "p384", "ed25519", "rsa"])
def test_each_leaf_key_type_signs_and_verifies(kind: str) -> None:
    ident = authority().leaf(SERVER_ID, kind)
    client, _server = connected_pair(server_cfg=server_config(ident))
    c = _complete(drain(client))
    expected = {
        "p256": SignatureScheme.ecdsa_secp256r1_sha256,
        "p384": SignatureScheme.ecdsa_secp384r1_sha384,
        "ed25519": SignatureScheme.ed25519,
        "rsa": SignatureScheme.rsa_pss_rsae_sha256,
    }[kind]
    assert c.signature_scheme == expected


def test_hello_retry_request_when_client_offers_only_p256_share() -> None:
    client, server = connected_pair(
        client_config(key_share_groups=(NamedGroup.secp256r1,)),
    )
    c, s = _complete(drain(client)), _complete(drain(server))
    # The server prefers the hybrid, so it asks for an X25519MLKEM768 share.
    assert c.group == s.group == NamedGroup.X25519MLKEM768


def test_hello_retry_request_when_client_supports_only_p256() -> None:
    client, server = connected_pair(
        client_config(groups=(NamedGroup.secp256r1,), key_share_groups=()),
    )
    assert _complete(drain(client)).group == NamedGroup.secp256r1
    assert _complete(drain(server)).group == NamedGroup.secp256r1


def test_no_common_group_is_a_handshake_failure() -> None:
    client = ClientConnection(
        client_config(groups=(NamedGroup.secp384r1,), key_share_groups=(NamedGroup.secp384r1,)),
        now=NOW,
    )
    server = ServerConnection(
        server_config(groups=(NamedGroup.X25519MLKEM768, NamedGroup.x25519)), now=NOW
    )
    with pytest.raises(TLSError) as info:
        server.receive_data(client.data_to_send())
    assert info.value.alert == AlertDescription.handshake_failure
    client.receive_data(server.data_to_send())
    assert AlertReceived(2, AlertDescription.handshake_failure) in drain(client)


def test_svids_from_the_project_ca_with_name_constrained_intermediates_verify() -> None:
    server_ident, client_ident = ca_issued("server"), ca_issued("client")
    client, server = connected_pair(client_config(client_ident), server_config(server_ident))
    assert _complete(drain(client)).peer_spiffe_id == SERVER_ID
    assert _complete(drain(server)).peer_spiffe_id == CLIENT_ID


def test_peer_certificate_event_carries_spiffe_id_and_chain() -> None:
    _client, server = connected_pair()
    peers = [e for e in drain(server) if isinstance(e, PeerCertificate)]
    assert peers[0].spiffe_id == CLIENT_ID
    assert len(peers[0].chain) == 2


def test_alpn_mismatch_is_no_application_protocol() -> None:
    client = ClientConnection(client_config(alpn_protocols=("http/1.1",)), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        server.receive_data(client.data_to_send())
    assert info.value.alert == AlertDescription.no_application_protocol


def test_no_alpn_offered_means_no_alpn_selected() -> None:
    client, _server = connected_pair(client_config(alpn_protocols=()))
    assert _complete(drain(client)).alpn_protocol is None


def test_key_update_requested_by_client_rotates_both_directions() -> None:
    client, server = connected_pair()
    drain(client), drain(server)
    before_c, before_s = client.traffic_secrets(), server.traffic_secrets()
    client.update_key(request_peer_update=True)
    client.send_application_data(b"after update")
    pump(client, server)
    events = drain(server)
    assert (
        KeyUpdated("read", requested=True) in events
        and KeyUpdated("write", requested=False) in events
    )
    assert ApplicationData(b"after update") in events
    server.send_application_data(b"reply")
    pump(server, client)
    assert ApplicationData(b"reply") in drain(client)
    after_c, after_s = client.traffic_secrets(), server.traffic_secrets()
    assert (
        after_c.write.secret != before_c.write.secret
        and after_s.write.secret != before_s.write.secret
    )
    assert after_c.write == after_s.read and after_s.write == after_c.read


def test_automatic_key_update_before_record_limit() -> None:
    client, server = connected_pair(client_config(key_update_after_records=3))
    drain(client), drain(server)
    for i in range(10):
        client.send_application_data(b"x%d" % i)
    server.receive_data(client.data_to_send())
    events = drain(server)
    assert [e.data for e in events if isinstance(e, ApplicationData)] == [
        b"x%d" % i for i in range(10)
    ]
    assert sum(isinstance(e, KeyUpdated) for e in events) >= 2


def test_close_notify_half_closes_and_peer_can_still_send() -> None:
    client, server = connected_pair()
    drain(client), drain(server)
    client.close()
    server.receive_data(client.data_to_send())
    assert ConnectionClosed(clean=True) in drain(server)
    server.send_application_data(b"late reply")
    client.receive_data(server.data_to_send())
    assert ApplicationData(b"late reply") in drain(client)
    with pytest.raises(LocalProtocolError):
        client.send_application_data(b"no more")


def test_bare_eof_is_reported_as_unclean_close() -> None:
    _client, server = connected_pair()
    drain(server)
    server.receive_data(b"")
    assert drain(server) == [ConnectionClosed(clean=False)]


def test_large_data_is_split_into_records_and_reassembled() -> None:
    client, server = connected_pair()
    drain(server)
    payload = bytes(range(256)) * 4096  # 1 MiB
    client.send_application_data(payload)
    wire = client.data_to_send()
    assert len(wire) > len(payload)
    server.receive_data(wire)
    got = b"".join(e.data for e in drain(server) if isinstance(e, ApplicationData))
    assert got == payload


def test_record_padding_is_sent_and_stripped() -> None:
    client, server = connected_pair(client_config(record_padding=256))
    drain(server)
    client.send_application_data(b"a")
    wire = client.data_to_send()
    assert len(wire) == 5 + 256 + 16
    server.receive_data(wire)
    assert ApplicationData(b"a") in drain(server)


def test_traffic_secrets_match_between_peers() -> None:
    client, server = connected_pair()
    c, s = client.traffic_secrets(), server.traffic_secrets()
    assert c.cipher_suite == s.cipher_suite
    assert c.write == s.read and c.read == s.write
    assert len(c.write.key) == 16 and len(c.write.iv) == 12


def test_key_log_lines_are_in_sslkeylogfile_format() -> None:
    lines: list[str] = []
    client, _server = connected_pair(client_config(key_log=lines.append))
    labels = [line.split()[0] for line in lines]
    assert labels == [
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
        "SERVER_HANDSHAKE_TRAFFIC_SECRET",
        "SERVER_TRAFFIC_SECRET_0",
        "CLIENT_TRAFFIC_SECRET_0",
        "EXPORTER_SECRET",
    ]
    assert all(len(line.split()[1]) == 64 for line in lines)
    assert lines[2].split()[2] == client.traffic_secrets().read.secret.hex()


def test_session_ticket_from_server_becomes_event() -> None:
    from sidecar.tls.messages import NewSessionTicket, push_new_session_ticket
    from sidecar.tls.record import ContentType

    client, server = connected_pair()
    drain(client)
    # Issuing tickets is the next issue's; craft one with the server's record layer.
    server._seal(
        ContentType.handshake,
        push_new_session_ticket(NewSessionTicket(3600, 7, b"\x00", b"ticket", ())),
    )
    client.receive_data(server.data_to_send())
    (ticket,) = drain(client)
    assert ticket.ticket == b"ticket" and ticket.lifetime == 3600 and len(ticket.psk) == 32  # type: ignore[attr-defined]


# --- certificate failures end with the matching alert --------------------------------


def _server_alert(client_ident: object = None, **client_overrides: object) -> AlertDescription:
    client = ClientConnection(client_config(client_ident, **client_overrides), now=NOW)  # type: ignore[arg-type]
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    return info.value.alert


def test_expired_client_certificate_is_certificate_expired() -> None:
    expired = authority().leaf(
        CLIENT_ID, not_after=NOW - dt.timedelta(minutes=1), not_before=NOW - dt.timedelta(hours=2)
    )
    assert _server_alert(expired) == AlertDescription.certificate_expired


def test_client_certificate_from_unknown_ca_is_unknown_ca() -> None:
    stranger = authority("p256", "Stranger").leaf(CLIENT_ID)
    assert _server_alert(stranger, trust_bundles=identity().bundles) == AlertDescription.unknown_ca


def test_client_certificate_with_server_auth_only_is_unsupported_certificate() -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    server_only = authority().leaf(CLIENT_ID, ekus=(ExtendedKeyUsageOID.SERVER_AUTH,))
    assert _server_alert(server_only) == AlertDescription.unsupported_certificate


def test_a_leaf_whose_spiffe_id_has_no_path_is_bad_certificate() -> None:
    """X509-SVID §2: a leaf names a workload, so its SPIFFE ID has a path; a bare trust
    domain is refused on the unconstrained path as `ca.check_leaf` refuses it on the
    name-constrained one."""
    bare = authority().leaf("spiffe://example.org")
    assert _server_alert(bare) == AlertDescription.bad_certificate


def test_client_without_certificate_is_certificate_required() -> None:
    cfg = client_config(certificate_chain=(), private_key=None)
    client = ClientConnection(cfg, now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == AlertDescription.certificate_required
    client.receive_data(server.data_to_send())
    events = drain(client)
    assert AlertReceived(2, AlertDescription.certificate_required) in events
    assert events[-1] == ConnectionClosed(clean=False)


def test_policy_hook_refusing_the_peer_is_access_denied() -> None:
    seen: list[SpiffeId] = []

    def policy(spiffe_id: SpiffeId) -> bool:
        seen.append(spiffe_id)
        return False

    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(peer_policy=policy), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == AlertDescription.access_denied
    assert seen == [CLIENT_ID]


def test_server_certificate_expired_is_reported_by_client() -> None:
    expired = authority().leaf(
        SERVER_ID, not_after=NOW - dt.timedelta(minutes=1), not_before=NOW - dt.timedelta(hours=2)
    )
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(expired), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == AlertDescription.certificate_expired


def test_server_certificate_with_client_auth_only_is_rejected_by_client() -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    client_only = authority().leaf(SERVER_ID, ekus=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(client_only), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == AlertDescription.unsupported_certificate


def test_server_without_client_auth_accepts_anonymous_client() -> None:
    _client, server = connected_pair(
        client_config(certificate_chain=(), private_key=None),
        server_config(require_client_certificate=False, verify_peer=False),
    )
    assert _complete(drain(server)).peer_spiffe_id is None


def test_without_middlebox_compatibility_no_change_cipher_spec_is_sent() -> None:
    client = ClientConnection(
        client_config(middlebox_compatibility=False, rng=DeterministicRng()), now=NOW
    )
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(client.data_to_send())
    flight = server.data_to_send()
    assert b"\x14\x03\x03\x00\x01\x01" not in flight
    client.receive_data(flight)
    assert client.handshake_complete


def test_middlebox_compatibility_sends_one_change_cipher_spec_each_way() -> None:
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(client.data_to_send())
    flight = server.data_to_send()
    assert flight.count(b"\x14\x03\x03\x00\x01\x01") == 1
    client.receive_data(flight)
    assert client.data_to_send().startswith(b"\x14\x03\x03\x00\x01\x01")


def test_client_meeting_a_tls12_server_hello_sends_protocol_version() -> None:
    from sidecar.tls.messages import ServerHello, push_server_hello
    from sidecar.tls.record import plaintext_record

    client = ClientConnection(client_config(), now=NOW)
    hello = client.data_to_send()
    session_id = hello[5 + 4 + 2 + 32 + 1 : 5 + 4 + 2 + 32 + 1 + 32]
    tls12 = ServerHello(bytes(24) + b"DOWNGRD\x01", session_id, 0x1301, ())
    with pytest.raises(TLSError) as info:
        client.receive_data(plaintext_record(22, push_server_hello(tls12)))
    assert info.value.alert == AlertDescription.protocol_version
    assert client.data_to_send() == b"\x15\x03\x03\x00\x02\x02\x46"


def test_rsa_pss_certificate_negotiates_rsa_pss_pss(tmp_path: object) -> None:
    import subprocess
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    d = Path(str(tmp_path))
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa-pss",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-keyout",
            str(d / "k.pem"),
            "-out",
            str(d / "c.pem"),
            "-nodes",
            "-subj",
            "/CN=pss",
            "-days",
            "2",
            "-addext",
            f"subjectAltName=critical,URI:{SERVER_ID}",
        ],
        check=True,
        capture_output=True,
    )
    cert = x509.load_pem_x509_certificate((d / "c.pem").read_bytes())
    key = load_pem_private_key((d / "k.pem").read_bytes(), None)
    client, _server = connected_pair(
        client_config(verify_peer=False),
        server_config(certificate_chain=(cert,), private_key=key, verify_peer=False),
    )
    assert _complete(drain(client)).signature_scheme == SignatureScheme.rsa_pss_pss_sha256


def test_chain_signed_with_a_scheme_outside_signature_algorithms_cert_is_bad_certificate() -> None:
    # The test chain is ECDSA-signed; a client accepting only Ed25519 chains refuses it.
    client = ClientConnection(
        client_config(certificate_signature_schemes=(SignatureScheme.ed25519,)), now=NOW
    )
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == AlertDescription.bad_certificate


def test_peer_from_a_trust_domain_without_a_bundle_is_unknown_ca() -> None:
    other = authority("p256", "Other domain").leaf("spiffe://other.example/ns/default/sa/client")
    client = ClientConnection(client_config(other), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == AlertDescription.unknown_ca


def test_federated_trust_domains_each_verify_against_their_own_bundle() -> None:
    other_ca = authority("p256", "Federated")
    other = other_ca.leaf("spiffe://federated.example/ns/default/sa/client")
    bundles = {**identity().bundles, "federated.example": [other_ca.root]}
    _client, server = connected_pair(
        client_config(other, trust_bundles=identity().bundles), server_config(trust_bundles=bundles)
    )
    assert _complete(drain(server)).peer_spiffe_id == SpiffeId(
        "spiffe://federated.example/ns/default/sa/client"
    )


def test_leaf_with_two_uri_sans_is_bad_certificate() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = authority()
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.intermediate.subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(str(CLIENT_ID)),
                    x509.UniformResourceIdentifier(str(SERVER_ID)),
                ]
            ),
            critical=True,
        )
        .sign(ca.intermediate_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    client = ClientConnection(
        client_config(certificate_chain=(leaf, ca.intermediate), private_key=key), now=NOW
    )
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == AlertDescription.bad_certificate


def test_missing_now_is_a_local_error_not_a_protocol_alert() -> None:
    client = ClientConnection(client_config())  # no `now`
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(client.data_to_send())
    with pytest.raises(LocalProtocolError):
        client.receive_data(server.data_to_send())


def test_closed_flags_follow_close_notify_in_each_direction() -> None:
    client, server = connected_pair()
    assert not (client.read_closed or client.write_closed)
    client.close()
    assert client.write_closed and not client.read_closed
    server.receive_data(client.data_to_send())
    assert server.read_closed and not server.write_closed
    server.close()
    client.receive_data(server.data_to_send())
    assert client.read_closed and server.write_closed


def test_not_yet_valid_client_certificate_is_bad_certificate() -> None:
    future = authority().leaf(
        CLIENT_ID, not_before=NOW + dt.timedelta(hours=1), not_after=NOW + dt.timedelta(hours=2)
    )
    assert _server_alert(future) == AlertDescription.bad_certificate
