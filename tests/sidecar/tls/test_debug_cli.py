"""`trellis debug tls-server` / `tls-client`: real processes, and their refusals.

The happy paths run the CLI as processes talking to each other and to `openssl
s_server`; the refusals run `trellis.cli.main` in-process (one line on stderr, exit 1
for a refused operation, 2 for a malformed command line).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from sidecar.tls import TrafficSecrets
from sidecar.tls.shell import open_tls_connection
from tests.support import free_port
from trellis.cli import main

from .test_interop_system_fixtures import (
    CLIENT_ID,
    SERVER_ID,
    client_svid,
    debug_tls_server,
    foreign_svid,
    openssl_args,
    peer_process,
    run,
    server_svid,
    trellis_args,
)


def tls_client(port: int, *extra: str, path: str = "/cli") -> list[str]:
    return trellis_args("debug", "tls-client", f"https://localhost:{port}{path}", *extra)


def _client_flags() -> list[str]:
    ident = client_svid()
    return ["--cert", ident.cert, "--key", ident.key_file, "--bundle", ident.bundle]


def _fields(output: str) -> dict[str, str]:
    head = output.split("\n\n", 1)[0]
    return dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)


def _client_against_server(
    client_extra: list[str], server_extra: tuple[str, ...]
) -> tuple[int, str, str]:
    async def scenario() -> tuple[int, str, str]:
        async with debug_tls_server(*server_extra) as (port, server):
            client = peer_process(*tls_client(port, *client_extra), stdin=False)
            async with client as running:
                code, output = await running.finish()
            server.process.terminate()
            _, server_output = await server.finish()
        return code, output, server_output

    return run(scenario(), timeout=60)


def _mtls() -> tuple[str, ...]:
    return ("--bundle", server_svid().bundle, "--require-client-cert")


def test_tls_client_and_server_negotiate_the_hybrid_and_name_each_other() -> None:
    code, output, _ = _client_against_server(_client_flags(), _mtls())
    assert code == 0, output
    fields = _fields(output)
    assert fields["version"] == "TLSv1.3"
    assert fields["cipher_suite"] == "TLS_AES_128_GCM_SHA256"
    assert fields["group"] == "X25519MLKEM768"
    assert fields["alpn"] == "http/1.1"
    assert fields["peer_spiffe_id"] == SERVER_ID
    body = output.split("\r\n\r\n", 1)[1]
    assert "HTTP/1.1 200 OK" in output
    assert f"peer_spiffe_id: {CLIENT_ID}" in body  # the server's view, in its body
    assert "request: GET /cli" in body


def test_groups_flags_choose_the_group() -> None:
    code, output, _ = _client_against_server(
        [*_client_flags(), "--groups", "X25519MLKEM768,X25519"],
        (*_mtls(), "--groups", "secp256r1,X25519"),
    )
    assert code == 0, output
    assert _fields(output)["group"] == "x25519"


def test_insecure_client_without_certificate_talks_to_a_server_not_asking_for_one() -> None:
    code, output, _ = _client_against_server(["--insecure"], ())
    assert code == 0, output
    assert _fields(output)["peer_spiffe_id"] == SERVER_ID  # read, though not verified
    body = output.split("\r\n\r\n", 1)[1]
    assert "peer_spiffe_id: -" in body
    # No client certificate means no CertificateVerify: shown as "-", not as 0x0000.
    assert "signature_scheme: -" in body, body


def test_a_refused_client_is_one_error_line_and_the_server_logs_the_alert() -> None:
    ident = foreign_svid()
    flags = ["--cert", ident.cert, "--key", ident.key_file, "--bundle", server_svid().bundle]
    code, output, server_output = _client_against_server(flags, _mtls())
    assert code == 1
    assert output.strip().splitlines()[-1].startswith("trellis: error: ")
    assert "unknown_ca" in output
    assert "we sent alert unknown_ca" in server_output


def test_keylog_writes_nss_key_log_lines_to_a_private_file(tmp_path: Path) -> None:
    keylog = tmp_path / "keys.log"
    code, output, _ = _client_against_server(_client_flags(), (*_mtls(), "--keylog", str(keylog)))
    assert code == 0, output
    labels = {line.split()[0] for line in keylog.read_text().splitlines()}
    assert labels == {
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
        "SERVER_HANDSHAKE_TRAFFIC_SECRET",
        "CLIENT_TRAFFIC_SECRET_0",
        "SERVER_TRAFFIC_SECRET_0",
        "EXPORTER_SECRET",
    }
    assert keylog.stat().st_mode & 0o777 == 0o600


def test_tls_client_against_s_server_limited_to_p256_is_retried_into_it() -> None:
    async def scenario() -> tuple[int, str]:
        ident = server_svid()
        argv = openssl_args(
            "s_server", "-accept", "127.0.0.1:0", "-tls1_3", "-groups", "P-256",
            "-cert", ident.leaf_file, "-cert_chain", ident.intermediate_file,
            "-key", ident.key_file, "-CAfile", ident.bundle, "-Verify", "1",
            "-verify_return_error", "-www",
        )  # fmt: skip
        async with peer_process(*argv) as server:
            line = await server.wait_for_line(b"ACCEPT")
            port = int(line.rsplit(b":", 1)[1])
            client = peer_process(*tls_client(port, *_client_flags()), stdin=False)
            async with client as running:
                return await running.finish()

    code, output = run(scenario(), timeout=60)
    assert code == 0, output
    assert _fields(output)["group"] == "secp256r1"
    assert "Shared groups: secp256r1" in output  # s_server's page


# --- for conformance and interop runs (issue 23) ----------------------------------------


async def _engine_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await open_tls_connection(
        "127.0.0.1", port, config=client_svid().config(), server_name="localhost"
    )


def test_echo_mode_sends_application_data_back_as_it_comes() -> None:
    async def scenario() -> list[bytes]:
        async with debug_tls_server("--echo") as (port, server):
            reader, writer = await _engine_client(port)
            echoed = []
            for message in (b"first\n", b"x" * 40_000 + b"\n", b"GET / HTTP/1.1\r\n\r\n"):
                writer.write(message)
                echoed.append(await asyncio.wait_for(reader.readexactly(len(message)), 10))
            writer.close()
            server.process.terminate()
            await server.finish()
        return echoed

    assert run(scenario(), timeout=60) == [
        b"first\n",
        b"x" * 40_000 + b"\n",
        b"GET / HTTP/1.1\r\n\r\n",
    ]


def test_a_request_line_without_its_blank_line_is_answered_after_a_short_wait() -> None:
    async def scenario() -> bytes:
        async with debug_tls_server() as (port, server):
            reader, writer = await _engine_client(port)
            writer.write(b"GET /bare HTTP/1.0\r\n")  # and nothing more, connection open
            response = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            server.process.terminate()
            await server.finish()
        return response

    response = run(scenario(), timeout=60)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n"), response
    assert b"request: GET /bare\n" in response


def test_get_keyupdate_makes_the_server_update_its_keys_and_request_the_clients() -> None:
    async def scenario() -> tuple[bytes, TrafficSecrets, TrafficSecrets]:
        async with debug_tls_server() as (port, server):
            reader, writer = await _engine_client(port)
            before = writer.get_extra_info("traffic_secrets")
            writer.write(b"GET /keyupdate HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = await asyncio.wait_for(reader.read(), 10)
            after = writer.get_extra_info("traffic_secrets")
            writer.close()
            server.process.terminate()
            await server.finish()
        return response, before, after

    response, before, after = run(scenario(), timeout=60)
    assert b"key_update: sent, update_requested\n" in response, response
    # The server's KeyUpdate moved our read secret; its update_requested made us answer
    # with our own (RFC 8446 §4.6.3), which moved our write secret.
    assert after.read.secret != before.read.secret
    assert after.write.secret != before.write.secret


@pytest.mark.parametrize("group", ["X448", "secp521r1", "SecP384r1MLKEM1024"])
def test_tls_client_offering_only_a_new_group_gets_it_from_a_default_server(group: str) -> None:
    code, output, _ = _client_against_server([*_client_flags(), "--groups", group], _mtls())
    assert code == 0, output
    assert _fields(output)["group"].lower() == group.lower()


# --- refusals, in-process ---------------------------------------------------------------


def _server_args(*extra: str) -> list[str]:
    ident = server_svid()
    return ["debug", "tls-server", "--port", "0", "--cert", ident.cert, "--key", ident.key_file,
            *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["debug", "tls-server", "--port", "0", "--cert", "/nonexistent.pem", "--key", "/k"],
            "cannot read certificate /nonexistent.pem: No such file or directory",
        ),
        (_server_args("--require-client-cert"), "--require-client-cert needs --bundle"),
        (["debug", "tls-client", "https://localhost:1/"], "give --bundle"),
        (["debug", "tls-client", "http://localhost:1/", "--insecure"], "is not an https:// URL"),
    ],
)
def test_refusals_are_one_line_and_exit_1(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trellis: error: ") and message in err, err


def test_a_key_that_does_not_match_the_certificate_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ident = server_svid()
    argv = ["debug", "tls-server", "--port", "0", "--cert", ident.cert]
    assert main([*argv, "--key", client_svid().key_file]) == 1
    assert "is not the key of the first certificate" in capsys.readouterr().err


def test_a_bundle_that_is_not_pem_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("not pem\n")
    assert main(_server_args("--bundle", str(bundle), "--require-client-cert")) == 1
    assert "holds no PEM certificate" in capsys.readouterr().err


def test_a_bundle_root_naming_no_trust_domain_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web PKI root")])
    now = dt.datetime.now(dt.UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(root.public_bytes(Encoding.PEM))
    assert main(_server_args("--bundle", str(bundle), "--require-client-cert")) == 1
    assert "names no trust domain" in capsys.readouterr().err


def test_an_unreachable_server_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert main(["debug", "tls-client", f"https://127.0.0.1:{port}/", "--insecure"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"trellis: error: 127.0.0.1:{port}: ") and err.count("\n") == 1, err


def test_a_port_in_use_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        argv = _server_args()
        argv[argv.index("--port") + 1] = str(port)
        assert main(argv) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["debug", "tls-client", "https://localhost/", "--groups", "ffdhe2048"],
        ["debug", "tls-server", "--port", "99999", "--cert", "c", "--key", "k"],
        ["debug", "tls-server", "--cert", "c", "--key", "k"],
    ],
)
def test_malformed_command_lines_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err
