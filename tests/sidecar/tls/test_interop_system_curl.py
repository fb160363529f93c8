"""Real peer: `curl --tlsv1.3` (OpenSSL 3.0) against `trellis debug tls-server`.

curl checks the server's name, so the server SVID carries the DNS SAN `localhost`
besides its SPIFFE ID, and curl is pointed at https://localhost:PORT/.
"""

from __future__ import annotations

from .test_interop_system_fixtures import (
    CLIENT_ID,
    client_svid,
    debug_tls_server,
    foreign_svid,
    peer_process,
    require,
    run,
    server_svid,
)


def curl(port: int, *extra: str) -> list[str]:
    return [
        require("curl"),
        "--silent",
        "--show-error",
        "--max-time",
        "10",
        "--tlsv1.3",
        "--cacert",
        server_svid().bundle,
        *extra,
        f"https://localhost:{port}/interop",
    ]


def _curl_against_debug_server(*extra: str, server_flags: tuple[str, ...] = ()) -> tuple[int, str]:
    async def scenario() -> tuple[int, str]:
        flags = server_flags or ("--bundle", server_svid().bundle, "--require-client-cert")
        async with debug_tls_server(*flags) as (port, _server):
            client = peer_process(*curl(port, *extra), stdin=False)
            async with client as running:
                return await running.finish()

    return run(scenario())


def test_curl_with_an_svid_gets_200_naming_its_spiffe_id_and_x25519() -> None:
    ident = client_svid()
    code, output = _curl_against_debug_server("--cert", ident.cert, "--key", ident.key_file)
    assert code == 0, output
    assert "request: GET /interop" in output
    assert f"peer_spiffe_id: {CLIENT_ID}" in output
    assert "group: x25519" in output  # OpenSSL 3.0 has no ML-KEM: the classical fallback
    assert "version: TLSv1.3" in output


def test_curl_negotiates_http11_by_alpn() -> None:
    ident = client_svid()
    code, output = _curl_against_debug_server(
        "--cert", ident.cert, "--key", ident.key_file, "--http1.1"
    )
    assert code == 0, output
    assert "alpn: http/1.1" in output


def test_curl_with_p256_curves_only_gets_p256() -> None:
    ident = client_svid()
    code, output = _curl_against_debug_server(
        "--cert", ident.cert, "--key", ident.key_file, "--curves", "prime256v1"
    )
    assert code == 0, output
    assert "group: secp256r1" in output


def test_curl_without_a_certificate_is_refused_with_certificate_required() -> None:
    code, output = _curl_against_debug_server()
    assert code != 0
    assert "certificate required" in output, output


def test_curl_from_another_trust_domain_is_refused() -> None:
    ident = foreign_svid()
    code, output = _curl_against_debug_server("--cert", ident.cert, "--key", ident.key_file)
    assert code != 0
    assert "unknown ca" in output, output


def test_curl_without_a_certificate_is_served_when_the_server_does_not_ask() -> None:
    code, output = _curl_against_debug_server(server_flags=("--groups", "X25519"))
    assert code == 0, output
    assert "peer_spiffe_id: -" in output
    assert "group: x25519" in output
