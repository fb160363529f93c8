"""Real peer: the system `openssl s_client` / `s_server` (OpenSSL 3.0, no ML-KEM).

Both directions over loopback, mutual TLS with SVIDs from `ca`. OpenSSL 3.0 does not
know X25519MLKEM768, so the expected outcome is the X25519 fallback, and a
HelloRetryRequest when it offers only P-256 (or when we do). `-msg` shows the
handshake messages, so a retry is visible as a second ClientHello.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from sidecar.tls import AlertDescription, NamedGroup, TLSError
from sidecar.tls.shell import PeerAlertError, open_tls_connection

from .test_interop_system_fixtures import (
    CLIENT_ID,
    SERVER_ID,
    Svid,
    client_svid,
    foreign_svid,
    openssl_args,
    peer_process,
    run,
    server_svid,
    tls_echo_server,
)


def s_client(port: int, ident: Svid | None, *extra: str) -> list[str]:
    argv = [
        *openssl_args("s_client"),
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "localhost",
        "-CAfile",
        server_svid().bundle,
        "-verify_return_error",
        "-msg",
        "-ign_eof",
    ]
    if ident is not None:
        # -cert takes one certificate; -cert_chain adds the intermediate so it is sent.
        argv += ["-cert", ident.leaf_file, "-cert_chain", ident.intermediate_file]
        argv += ["-key", ident.key_file]
    return [*argv, *extra]


def s_server(*extra: str) -> list[str]:
    ident = server_svid()
    return [
        *openssl_args("s_server"),
        "-accept",
        "127.0.0.1:0",
        "-cert",
        ident.leaf_file,
        "-cert_chain",
        ident.intermediate_file,
        "-key",
        ident.key_file,
        "-CAfile",
        ident.bundle,
        "-Verify",
        "1",
        "-verify_return_error",
        "-msg",
        "-www",
        *extra,
    ]


def client_hellos(output: str) -> int:
    return len(re.findall(r"Handshake \[length [0-9a-f]+\], ClientHello", output))


async def _s_client_to_us(*extra: str, ident: Svid | None = None) -> tuple[int, str, list[object]]:
    async with tls_echo_server(server_svid().config()) as (port, seen):
        async with peer_process(*s_client(port, ident or client_svid(), *extra)) as peer:
            peer.send(b"ping\n")
            peer.close_stdin()
            code, output = await peer.finish()
        return code, output, seen


def test_s_client_with_default_groups_gets_the_x25519_fallback_without_a_retry() -> None:
    code, output, seen = run(_s_client_to_us("-tls1_3"))
    assert code == 0, output
    assert "Server Temp Key: X25519" in output
    assert "Verify return code: 0 (ok)" in output
    assert f"pong {CLIENT_ID} x25519" in output
    assert client_hellos(output) == 1
    assert [info.group for info in seen] == [NamedGroup.x25519]  # type: ignore[attr-defined]


def test_s_client_offering_only_p256_gets_p256_from_its_own_share() -> None:
    code, output, _ = run(_s_client_to_us("-tls1_3", "-groups", "P-256"))
    assert code == 0, output
    assert client_hellos(output) == 1, output  # OpenSSL sends a share for its only group
    assert "Server Temp Key: ECDH, prime256v1" in output
    assert f"pong {CLIENT_ID} secp256r1" in output


@pytest.mark.parametrize(
    ("groups", "temp_key", "engine_name"),
    [
        ("P-384", "ECDH, secp384r1", "secp384r1"),
        ("P-521", "ECDH, secp521r1", "secp521r1"),
        ("X448", "X448", "x448"),
    ],
)
def test_s_client_offering_only_a_classical_group_gets_it_from_its_own_share(
    groups: str, temp_key: str, engine_name: str
) -> None:
    # Every group a current peer may share is accepted as it comes, without a retry.
    code, output, _ = run(_s_client_to_us("-tls1_3", "-groups", groups))
    assert code == 0, output
    assert client_hellos(output) == 1, output
    assert f"Server Temp Key: {temp_key}" in output
    assert f"pong {CLIENT_ID} {engine_name}" in output


def test_s_client_whose_only_share_we_do_not_support_gets_a_hello_retry_request() -> None:
    # OpenSSL shares its first group only; finite-field groups (RFC 7919) are not ours.
    code, output, _ = run(_s_client_to_us("-tls1_3", "-groups", "ffdhe2048:X25519"))
    assert code == 0, output
    assert client_hellos(output) == 2, output  # the second follows our HelloRetryRequest
    assert "Server Temp Key: X25519" in output
    assert f"pong {CLIENT_ID} x25519" in output


def test_s_client_sharing_p256_gets_a_retry_from_a_server_limited_to_x25519() -> None:
    async def scenario() -> str:
        config = server_svid().config(groups=(NamedGroup.X25519MLKEM768, NamedGroup.x25519))
        async with tls_echo_server(config) as (port, _):
            argv = s_client(port, client_svid(), "-tls1_3", "-groups", "P-256:X25519")
            async with peer_process(*argv) as peer:
                peer.send(b"ping\n")
                peer.close_stdin()
                _, output = await peer.finish()
        return output

    output = run(scenario())
    assert client_hellos(output) == 2, output
    assert f"pong {CLIENT_ID} x25519" in output


def test_s_client_with_chacha20_only_negotiates_it() -> None:
    code, output, _ = run(
        _s_client_to_us("-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256")
    )
    assert code == 0, output
    assert "Cipher is TLS_CHACHA20_POLY1305_SHA256" in output


async def _us_to_s_server(
    *extra: str, groups: tuple[NamedGroup, ...] | None = None
) -> tuple[dict[str, object], bytes, str]:
    async with peer_process(*s_server(*extra)) as server:
        line = await server.wait_for_line(b"ACCEPT")
        port = int(line.rsplit(b":", 1)[1])
        overrides = {} if groups is None else {"groups": groups, "key_share_groups": groups[:1]}
        reader, writer = await open_tls_connection(
            "127.0.0.1",
            port,
            config=client_svid().config(**overrides),
            server_name="localhost",
            handshake_timeout=10,
        )
        info = {
            name: writer.get_extra_info(name)
            for name in ("tls_group", "cipher", "spiffe_id", "tls_version")
        }
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        page = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        server.process.kill()
        _, output = await server.finish()
    return info, page, output


def test_our_client_against_s_server_falls_back_to_x25519() -> None:
    info, page, output = run(_us_to_s_server("-tls1_3"))
    assert info["tls_group"] == "x25519"
    assert info["spiffe_id"] == SERVER_ID
    assert info["tls_version"] == "TLSv1.3"
    assert b"Shared groups: x25519" in page  # s_server's own report of the session
    assert b"Protocol  : TLSv1.3" in page
    assert client_hellos(output) == 1, output


def test_our_client_retries_when_s_server_wants_p256() -> None:
    info, page, output = run(_us_to_s_server("-tls1_3", "-groups", "P-256"))
    assert info["tls_group"] == "secp256r1"
    assert b"Shared groups: secp256r1" in page
    assert client_hellos(output) == 2, output  # s_server saw our retried ClientHello


def test_our_client_with_p256_only_sends_a_p256_share_directly() -> None:
    info, _, output = run(_us_to_s_server("-tls1_3", groups=(NamedGroup.secp256r1,)))
    assert info["tls_group"] == "secp256r1"
    assert client_hellos(output) == 1, output


# --- refusals ---------------------------------------------------------------------------


def _errors(seen: list[object]) -> list[AlertDescription]:
    return [e.alert for e in seen if isinstance(e, TLSError)]


def test_a_tls12_only_s_client_gets_protocol_version() -> None:
    code, output, seen = run(_s_client_to_us("-tls1_2"))
    assert code != 0
    assert "alert protocol version" in output, output
    assert _errors(seen) == [AlertDescription.protocol_version]


def test_s_client_without_a_certificate_gets_certificate_required() -> None:
    async def scenario() -> tuple[str, list[object]]:
        async with tls_echo_server(server_svid().config()) as (port, seen):
            async with peer_process(*s_client(port, None, "-tls1_3")) as peer:
                peer.send(b"ping\n")
                peer.close_stdin()
                _, output = await peer.finish()
            return output, seen

    output, seen = run(scenario())
    # TLS 1.3: the client's handshake is over before the server judges its certificate,
    # so s_client learns of the refusal as an alert on its first read.
    assert "certificate required" in output, output
    assert _errors(seen) == [AlertDescription.certificate_required]


def test_s_client_from_another_trust_domain_is_refused_with_unknown_ca() -> None:
    _, output, seen = run(_s_client_to_us("-tls1_3", ident=foreign_svid()))
    assert "unknown ca" in output, output
    assert _errors(seen) == [AlertDescription.unknown_ca]
    assert "pong" not in output


def test_our_client_refuses_an_s_server_from_another_trust_domain() -> None:
    async def scenario() -> BaseException:
        other = foreign_svid()
        argv = s_server("-tls1_3")
        argv[argv.index(server_svid().leaf_file)] = other.leaf_file
        argv[argv.index(server_svid().intermediate_file)] = other.intermediate_file
        argv[argv.index(server_svid().key_file)] = other.key_file
        async with peer_process(*argv) as server:
            line = await server.wait_for_line(b"ACCEPT")
            port = int(line.rsplit(b":", 1)[1])
            try:
                await open_tls_connection(
                    "127.0.0.1", port, config=client_svid().config(), server_name="localhost"
                )
            except (TLSError, PeerAlertError) as exc:
                return exc
        raise AssertionError("handshake succeeded")

    error = run(scenario())
    assert isinstance(error, TLSError)
    assert error.alert == AlertDescription.unknown_ca
