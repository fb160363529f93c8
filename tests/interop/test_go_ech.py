"""Encrypted ClientHello (RFC 9849) between Go's crypto/tls and the Trellis engine.

Go implements ECH on both sides (`Config.EncryptedClientHelloConfigList`,
`Config.EncryptedClientHelloKeys`); the Go side is the ``echpeer`` program. Both sides
present X509-SVIDs from the project's CA for the inner handshake and a WebPKI-style
certificate for the public name, which a rejection's outer handshake is checked against.
The engine runs over real loopback sockets, one thread per listener, at the real clock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from sidecar.tls import (
    ClientConnection,
    Event,
    HandshakeComplete,
    NamedGroup,
    ServerConnection,
    TLSConfig,
    TLSError,
)
from sidecar.tls.ech import ECHKey, ECHRejected
from tests.sidecar.tls.ech_support import (
    INNER_NAME,
    config_list,
    ech_key,
    public_name_credential,
)
from tests.sidecar.tls.test_interop_system_fixtures import Svid

from .conftest import GoPeers
from .test_go_crypto_tls import CLIENT_ID, SERVER_ID, svid

TIMEOUT = 20.0
LIVE = dt.datetime.now(dt.UTC).replace(microsecond=0)
KEY_1 = ech_key(1)
KEY_2 = ech_key(2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Svid, Svid]:
    """The server's and the client's SVID folders, each with the public name's files."""
    public = public_name_credential(LIVE)
    folder = tmp_path_factory.mktemp("go-ech")
    pair = (svid(SERVER_ID, "ecdsa", folder), svid(CLIENT_ID, "ecdsa", folder))
    for ident in pair:
        (ident.directory / "public.pem").write_bytes(
            public.credential.chain[0].public_bytes(Encoding.PEM)
        )
        key = public.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        (ident.directory / "public.key").write_bytes(key)
        (ident.directory / "public-root.pem").write_bytes(public.root.public_bytes(Encoding.PEM))
    return pair


def _server_config(ident: Svid, *keys: ECHKey, **overrides: Any) -> TLSConfig:
    return ident.config(
        ech_keys=keys, ech_public_credential=public_name_credential(LIVE).credential, **overrides
    )


def _client_config(ident: Svid, ech_list: bytes | None, **overrides: Any) -> TLSConfig:
    return ident.config(
        ech_config_list=ech_list,
        ech_public_name_roots=[public_name_credential(LIVE).root],
        **overrides,
    )


def _lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


# --- the engine's side, over loopback -------------------------------------------------


@dataclass
class _Served:
    events: list[list[Event]] = field(default_factory=list)
    errors: list[TLSError] = field(default_factory=list)

    def completions(self) -> list[HandshakeComplete]:
        return [e for conn in self.events for e in conn if isinstance(e, HandshakeComplete)]


@contextlib.contextmanager
def _engine_server(config: TLSConfig, connections: int) -> Iterator[tuple[int, _Served]]:
    """`connections` connections, one after the other, each run by a ServerConnection."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    served = _Served()

    def run() -> None:
        for _ in range(connections):
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            server = ServerConnection(config, now=time.time())
            events: list[Event] = []
            served.events.append(events)
            with conn:
                for _ in range(64):  # bounded: a handshake and a close
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        break
                    try:
                        server.receive_data(data)
                    except TLSError as exc:
                        served.errors.append(exc)
                    events.extend(server.events())
                    out = server.data_to_send()
                    with contextlib.suppress(OSError):
                        if out:
                            conn.sendall(out)
                    if not data or server.read_closed:
                        break

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], served
    finally:
        thread.join(TIMEOUT)
        listener.close()
        assert not thread.is_alive(), "the engine's server thread did not end"


def _engine_client(config: TLSConfig, port: int) -> HandshakeComplete:
    """One handshake to `port`; ECHRejected and other TLSErrors propagate."""
    client = ClientConnection(config, server_name=INNER_NAME, now=time.time())
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(client.data_to_send())
        for _ in range(16):
            data = sock.recv(65536)
            try:
                client.receive_data(data)
            finally:
                with contextlib.suppress(OSError):
                    sock.sendall(client.data_to_send())
            if client.handshake_complete or not data:
                break
        client.close()
        sock.sendall(client.data_to_send())
        sock.shutdown(socket.SHUT_WR)
    (done,) = [e for e in client.events() if isinstance(e, HandshakeComplete)]
    return done


@contextlib.contextmanager
def _go_server(
    peers: GoPeers, ident: Svid, keys: list[ECHKey], connections: int
) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    argv = [str(peers.echpeer), "server", "-dir", str(ident.directory)]
    argv += ["-connections", str(connections)]
    if keys:
        key_file = ident.directory / "ech-keys.json"
        key_file.write_text(
            json.dumps(
                [
                    {
                        "config": k.config.raw.hex(),
                        "private_key": k.private_key.private_bytes_raw().hex(),
                        "send_as_retry": True,
                    }
                    for k in keys
                ]
            )
        )
        key_file.chmod(0o600)
        argv += ["-ech-keys", str(key_file)]
    go = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert go.stdout is not None
        line = go.stdout.readline()
        assert '"listening"' in line, line
        yield int(json.loads(line)["addr"].rsplit(":", 1)[1]), go
    finally:
        if go.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                go.wait(TIMEOUT)
        if go.poll() is None:
            go.kill()
            go.wait()


def _go_output(go: subprocess.Popen[str]) -> tuple[int, str]:
    assert go.stdout is not None
    output = go.stdout.read()
    return go.wait(TIMEOUT), output


def _go_client(peers: GoPeers, ident: Svid, port: int, ech_list: bytes, *extra: str) -> Any:
    argv = [str(peers.echpeer), "client", "-dir", str(ident.directory)]
    argv += ["-connect", f"127.0.0.1:{port}", "-server-name", INNER_NAME]
    argv += ["-ech-config-list", ech_list.hex(), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)


# --- a Go client against the engine's server -------------------------------------------


def test_a_go_client_has_its_ech_accepted_by_the_engine_and_both_see_the_inner_name(
    go_peers: GoPeers, dirs: tuple[Svid, Svid]
) -> None:
    server_svid, client_svid = dirs
    with _engine_server(_server_config(server_svid, KEY_1), 1) as (port, served):
        go = _go_client(go_peers, client_svid, port, config_list(KEY_1))
    assert go.returncode == 0, go.stderr
    (shake,) = _lines(go.stdout)
    assert (shake["ech_accepted"], shake["server_name"]) == (True, INNER_NAME)
    (done,) = served.completions()
    assert (done.ech, done.server_name, str(done.peer_spiffe_id)) == (
        "accepted",
        INNER_NAME,
        CLIENT_ID,
    )


def test_a_go_client_with_a_rotated_out_config_retries_with_the_engines_retry_configs(
    go_peers: GoPeers, dirs: tuple[Svid, Svid]
) -> None:
    server_svid, client_svid = dirs
    with _engine_server(_server_config(server_svid, KEY_2), 2) as (port, served):
        go = _go_client(go_peers, client_svid, port, config_list(KEY_1), "-retry")
    assert go.returncode == 0, go.stderr
    rejected, shake = _lines(go.stdout)
    assert rejected == {"event": "ech_rejected", "retry_configs": config_list(KEY_2).hex()}
    assert (shake["ech_accepted"], shake["server_name"]) == (True, INNER_NAME)
    (done,) = served.completions()
    assert done.ech == "accepted"


def test_a_go_client_has_ech_accepted_across_a_hello_retry_request(
    go_peers: GoPeers, dirs: tuple[Svid, Svid]
) -> None:
    """Without an HRR cookie: Go 1.26's client puts the cookie only in its second inner
    hello yet references it through ech_outer_extensions (it copies only key_share to
    the outer hello), so a server that sends a cookie cannot rebuild that hello and
    answers illegal_parameter, as RFC 9849 §7.1 requires. Go's own server sends none."""
    server_svid, client_svid = dirs
    config = _server_config(
        server_svid, KEY_1, groups=(NamedGroup.secp256r1,), send_hrr_cookie=False
    )
    with _engine_server(config, 1) as (port, served):
        go = _go_client(go_peers, client_svid, port, config_list(KEY_1))
    assert go.returncode == 0, (go.stderr, served.errors)
    (shake,) = _lines(go.stdout)
    assert (shake["ech_accepted"], shake["hello_retry"]) == (True, True)
    assert served.completions()[0].ech == "accepted"


# --- the engine's client against a Go server -------------------------------------------


def test_the_engine_has_its_ech_accepted_by_a_go_server_and_both_see_the_inner_name(
    go_peers: GoPeers, dirs: tuple[Svid, Svid]
) -> None:
    server_svid, client_svid = dirs
    with _go_server(go_peers, server_svid, [KEY_1], 1) as (port, go):
        done = _engine_client(_client_config(client_svid, config_list(KEY_1)), port)
        code, output = _go_output(go)
    assert code == 0, output
    (shake,) = _lines(output)
    assert (shake["ech_accepted"], shake["server_name"]) == (True, INNER_NAME)
    assert (done.ech, str(done.peer_spiffe_id)) == ("accepted", SERVER_ID)


def test_the_engine_retries_once_with_a_go_servers_retry_configs(
    go_peers: GoPeers, dirs: tuple[Svid, Svid]
) -> None:
    server_svid, client_svid = dirs
    with _go_server(go_peers, server_svid, [KEY_2], 2) as (port, go):
        with pytest.raises(ECHRejected) as rejected:
            _engine_client(_client_config(client_svid, config_list(KEY_1)), port)
        assert rejected.value.retry_configs == config_list(KEY_2)
        done = _engine_client(_client_config(client_svid, rejected.value.retry_configs), port)
        code, output = _go_output(go)
    assert code == 0, output
    failed, shake = _lines(output)
    assert (
        failed["event"] == "handshake_failed"
        and "encrypted client hello required" in failed["error"]
    )
    assert (shake["ech_accepted"], shake["server_name"]) == (True, INNER_NAME)
    assert done.ech == "accepted"


def test_the_engine_has_ech_accepted_by_a_go_server_across_a_hello_retry_request(
    go_peers: GoPeers, dirs: tuple[Svid, Svid]
) -> None:
    server_svid, client_svid = dirs
    config = _client_config(
        client_svid, config_list(KEY_1), key_share_groups=(NamedGroup.secp256r1,)
    )
    with _go_server(go_peers, server_svid, [KEY_1], 1) as (port, go):
        done = _engine_client(config, port)
        code, output = _go_output(go)
    assert code == 0, output
    (shake,) = _lines(output)
    assert (shake["ech_accepted"], shake["hello_retry"]) == (True, True)
    assert done.ech == "accepted"


def test_grease_ech_from_the_engine_completes_with_a_go_server_without_ech_keys(
    go_peers: GoPeers, dirs: tuple[Svid, Svid]
) -> None:
    server_svid, client_svid = dirs
    with _go_server(go_peers, server_svid, [], 1) as (port, go):
        done = _engine_client(client_svid.config(ech_grease=True), port)
        code, output = _go_output(go)
    assert code == 0, output
    (shake,) = _lines(output)
    assert (shake["ech_accepted"], shake["server_name"]) == (False, INNER_NAME)
    assert done.ech == "grease"
