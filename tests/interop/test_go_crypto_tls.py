"""Go's crypto/tls against the Trellis TLS 1.3 engine, both directions, over loopback.

The Go side is the ``tlspeer`` program (Go >= 1.26, go.mod at 1.26 so the ML-KEM
hybrids are on by default); the Trellis side is the engine in its asyncio shell. Both
present X509-SVIDs from the project's own CA (URI name-constrained intermediate, leaf
plus intermediate sent) and verify each other's chain: mutual TLS throughout.

Go has no knob for TLS 1.3 cipher suites or signature schemes, so those are chosen by
restricting the Trellis side (Go must then pick what is offered, or accept what is
chosen); groups are restricted on both sides. Each Go run prints the negotiated
parameters as a JSON line; the engine's view comes from ``get_extra_info``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ca.authority import IntermediateAuthority, RootAuthority
from ca.keys import private_key_pem
from ca.spiffeid import TrustDomain
from sidecar.tls import CipherSuite, NamedGroup, SignatureScheme, TLSConfig, TLSError
from sidecar.tls.shell import open_tls_connection, start_tls_server
from sidecar.tls.signatures import PrivateKey
from tests.sidecar.tls.test_interop_system_fixtures import Svid, peer_process, run

from .conftest import GoPeers

SERVER_ID = "spiffe://example.org/ns/default/sa/server"
CLIENT_ID = "spiffe://example.org/ns/default/sa/client"
FOREIGN_ID = "spiffe://other.org/ns/default/sa/intruder"
TIMEOUT = 20.0

# The engine's name for a group -> (tlspeer's -groups name, Go's CurveID.String()).
GO_GROUPS = {
    NamedGroup.X25519MLKEM768: ("X25519MLKEM768", "X25519MLKEM768"),
    NamedGroup.SecP256r1MLKEM768: ("SecP256r1MLKEM768", "SecP256r1MLKEM768"),
    NamedGroup.SecP384r1MLKEM1024: ("SecP384r1MLKEM1024", "SecP384r1MLKEM1024"),
    NamedGroup.x25519: ("X25519", "X25519"),
    NamedGroup.secp256r1: ("P256", "CurveP256"),
    NamedGroup.secp384r1: ("P384", "CurveP384"),
    NamedGroup.secp521r1: ("P521", "CurveP521"),
}
GO_SUITES = {
    CipherSuite.AES_128_GCM_SHA256: "TLS_AES_128_GCM_SHA256",
    CipherSuite.AES_256_GCM_SHA384: "TLS_AES_256_GCM_SHA384",
    CipherSuite.CHACHA20_POLY1305_SHA256: "TLS_CHACHA20_POLY1305_SHA256",
}
# Leaf key kind -> (the scheme TLS 1.3 signs CertificateVerify with, Go's key name).
LEAVES = {
    "ecdsa": (SignatureScheme.ecdsa_secp256r1_sha256, "ECDSA"),
    "ed25519": (SignatureScheme.ed25519, "Ed25519"),
    "rsa": (SignatureScheme.rsa_pss_rsae_sha256, "RSA"),  # RFC 8446 §4.2.3: PSS only
}


# --- SVIDs from the project's CA, written the way `trellis ca issue` writes them -----


@cache
def _authority(trust_domain: str) -> tuple[RootAuthority, IntermediateAuthority]:
    now = dt.datetime.now(dt.UTC)
    root = RootAuthority.create(TrustDomain(trust_domain), now=now - dt.timedelta(hours=1))
    return root, root.issue_intermediate("go-interop", now=now - dt.timedelta(minutes=30))


def _key(kind: str) -> PrivateKey:
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(65537, 2048)


@cache
def svid(spiffe_id: str, kind: str, directory: Path) -> Svid:
    trust_domain = spiffe_id.split("/")[2]
    root, intermediate = _authority(trust_domain)
    key = _key(kind)
    issued = intermediate.issue_x509_svid(
        spiffe_id, key.public_key(), now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    )
    from cryptography.hazmat.primitives.serialization import Encoding

    folder = directory / f"{spiffe_id.rsplit('/', 1)[-1]}-{trust_domain}-{kind}"
    folder.mkdir(parents=True)
    (folder / "svid.pem").write_bytes(issued.chain_pem())
    (folder / "svid.key").write_bytes(private_key_pem(key))
    (folder / "svid.key").chmod(0o600)
    # Both trust domains' roots: a foreign peer must fail on its ID, not on an unknown root.
    roots = [_authority(td)[0].certificate for td in ("example.org", "other.org")]
    (folder / "bundle.pem").write_bytes(b"".join(r.public_bytes(Encoding.PEM) for r in roots))
    return Svid(folder, tuple(issued.chain), key, (root.certificate,), trust_domain)


@pytest.fixture(scope="module")
def svids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("go-tls-svids")


# --- the two directions ---------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    go: list[dict[str, Any]]  # tlspeer's JSON lines
    engine: list[dict[str, Any]]  # what the engine reported per connection
    go_exit: int
    go_output: str


def _go_lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def _engine_view(writer: asyncio.StreamWriter) -> dict[str, Any]:
    view = {
        key: writer.get_extra_info(key)
        for key in ("tls_group", "cipher_suite", "signature_scheme", "spiffe_id")
    }
    view["tickets"] = len(writer.get_extra_info("tls_session_tickets") or ())
    return view


def go_client_to_engine(
    peers: GoPeers,
    config: TLSConfig,
    client: Svid,
    *go_args: str,
    key_update: bool = False,
) -> Outcome:
    """tlspeer client -> the engine's server, which echoes each line (and, with
    `key_update`, sends a KeyUpdate requesting the peer's after each echo)."""
    seen: list[dict[str, Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(_engine_view(writer))
        try:
            while line := await asyncio.wait_for(reader.readline(), TIMEOUT):
                writer.write(line)
                if key_update:
                    writer.transport.update_key(True)  # type: ignore[attr-defined]
                await writer.drain()
        finally:
            writer.close()

    async def scenario() -> Outcome:
        errors: list[BaseException] = []
        server = await start_tls_server(
            handle, "127.0.0.1", 0, config=config, on_error=lambda e, _p: errors.append(e)
        )
        port = server.sockets[0].getsockname()[1]
        try:
            argv = (str(peers.tlspeer), "client", "-dir", str(client.directory))
            async with peer_process(
                *argv, "-connect", f"127.0.0.1:{port}", *go_args, stdin=False
            ) as go:
                code, output = await go.finish(TIMEOUT)
        finally:
            server.close()
            await server.wait_closed()
        engine = seen + [{"error": repr(e)} for e in errors]
        return Outcome(_go_lines(output), engine, code, output)

    return run(scenario(), TIMEOUT * 2)


def engine_client_to_go(
    peers: GoPeers,
    config: TLSConfig,
    server: Svid,
    *go_args: str,
    lines: int = 1,
    key_update: bool = False,
) -> Outcome:
    """The engine's client -> tlspeer server (which echoes lines until close_notify)."""

    async def talk(port: int) -> dict[str, Any]:
        try:
            reader, writer = await open_tls_connection("127.0.0.1", port, config=config)
        except (TLSError, OSError) as exc:  # a refusal is what some tests assert
            return {"error": repr(exc)}
        for i in range(lines):
            line = f"line {i} from trellis\n".encode()
            writer.write(line)
            if key_update:
                writer.transport.update_key(True)  # type: ignore[attr-defined]
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == line
        # The Go server sends its NewSessionTicket right after the handshake: an echo
        # later it has arrived.
        view = _engine_view(writer)
        writer.write_eof()
        await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        return view

    async def scenario() -> Outcome:
        argv = (str(peers.tlspeer), "server", "-dir", str(server.directory), *go_args)
        async with peer_process(*argv, stdin=False) as go:
            line = await go.wait_for_line(b'"listening"', TIMEOUT)
            engine = [await talk(int(json.loads(line)["addr"].rsplit(":", 1)[1]))]
            code, output = await go.finish(TIMEOUT)
        return Outcome(_go_lines(output), engine, code, output)

    return run(scenario(), TIMEOUT * 2)


def server_config(
    ident: Svid,
    groups: Sequence[NamedGroup] | None = None,
    shares: Sequence[NamedGroup] | None = None,
    **overrides: Any,
) -> TLSConfig:
    fields: dict[str, Any] = {
        "trust_bundles": {"example.org": [_authority("example.org")[0].certificate]},
    }
    if groups is not None:
        fields["groups"] = tuple(groups)
        fields["key_share_groups"] = tuple(groups if shares is None else shares)
    fields.update(overrides)
    return ident.config(**fields)


def handshake(outcome: Outcome) -> dict[str, Any]:
    assert outcome.go_exit == 0, outcome.go_output
    shakes = [line for line in outcome.go if line["event"] == "handshake"]
    assert shakes, outcome.go_output
    return shakes[0]


# --- key exchange groups -----------------------------------------------------------------


@pytest.mark.parametrize("group", list(GO_GROUPS), ids=lambda g: g.name)
def test_a_go_client_negotiates_each_group_with_the_engine(
    go_peers: GoPeers, svids: Path, group: NamedGroup
) -> None:
    go_name, go_string = GO_GROUPS[group]
    config = server_config(svid(SERVER_ID, "ecdsa", svids), groups=[group])
    outcome = go_client_to_engine(
        go_peers, config, svid(CLIENT_ID, "ecdsa", svids), "-groups", go_name
    )
    go = handshake(outcome)
    assert (go["group"], go["hello_retry"]) == (go_string, False)
    assert (go["version"], go["peer_id"], go["peer_chain_len"]) == ("TLS 1.3", SERVER_ID, 2)
    assert outcome.engine == [
        {
            "tls_group": group.name,
            "cipher_suite": outcome.engine[0]["cipher_suite"],
            "signature_scheme": "ecdsa_secp256r1_sha256",
            "spiffe_id": CLIENT_ID,  # the Go client's SVID, verified by the engine
            "tickets": 0,
        }
    ]


@pytest.mark.parametrize("group", list(GO_GROUPS), ids=lambda g: g.name)
def test_the_engine_negotiates_each_group_with_a_go_server(
    go_peers: GoPeers, svids: Path, group: NamedGroup
) -> None:
    go_name, go_string = GO_GROUPS[group]
    config = server_config(svid(CLIENT_ID, "ecdsa", svids), groups=[group])
    outcome = engine_client_to_go(
        go_peers, config, svid(SERVER_ID, "ecdsa", svids), "-groups", go_name
    )
    go = handshake(outcome)
    assert (go["group"], go["hello_retry"], go["peer_id"]) == (go_string, False, CLIENT_ID)
    (engine,) = outcome.engine
    assert (engine["tls_group"], engine["spiffe_id"]) == (group.name, SERVER_ID)


@pytest.mark.parametrize("group", list(GO_GROUPS), ids=lambda g: g.name)
def test_an_engine_server_with_default_groups_takes_a_go_clients_only_share_without_a_retry(
    go_peers: GoPeers, svids: Path, group: NamedGroup
) -> None:
    # The server accepts a share for every group Go may send one for (issue: groups).
    go_name, go_string = GO_GROUPS[group]
    config = server_config(svid(SERVER_ID, "ecdsa", svids))
    outcome = go_client_to_engine(
        go_peers, config, svid(CLIENT_ID, "ecdsa", svids), "-groups", go_name
    )
    go = handshake(outcome)
    assert (go["group"], go["hello_retry"]) == (go_string, False)
    assert outcome.engine[0]["tls_group"] == group.name


def test_a_go_client_with_default_settings_negotiates_x25519mlkem768_with_the_engine(
    go_peers: GoPeers, svids: Path
) -> None:
    # Go 1.26's default CurvePreferences start with X25519MLKEM768 (shares: it and X25519).
    config = server_config(svid(SERVER_ID, "ecdsa", svids))
    go = handshake(go_client_to_engine(go_peers, config, svid(CLIENT_ID, "ecdsa", svids)))
    assert (go["group"], go["hello_retry"]) == ("X25519MLKEM768", False)


def test_the_engine_with_default_settings_negotiates_x25519mlkem768_with_a_go_server(
    go_peers: GoPeers, svids: Path
) -> None:
    config = server_config(svid(CLIENT_ID, "ecdsa", svids))
    outcome = engine_client_to_go(go_peers, config, svid(SERVER_ID, "ecdsa", svids))
    assert handshake(outcome)["group"] == "X25519MLKEM768"
    assert outcome.engine[0]["tls_group"] == "X25519MLKEM768"


# --- HelloRetryRequest ---------------------------------------------------------------------


def test_the_engine_answers_a_go_client_without_a_usable_share_with_hello_retry_request(
    go_peers: GoPeers, svids: Path
) -> None:
    # Go's default shares are X25519MLKEM768 and X25519; the engine takes only P-256,
    # which Go lists in supported_groups: RFC 8446 §4.1.4, one HelloRetryRequest.
    config = server_config(svid(SERVER_ID, "ecdsa", svids), groups=[NamedGroup.secp256r1])
    outcome = go_client_to_engine(go_peers, config, svid(CLIENT_ID, "ecdsa", svids))
    go = handshake(outcome)
    assert (go["group"], go["hello_retry"]) == ("CurveP256", True)
    assert outcome.engine[0]["tls_group"] == "secp256r1"


def test_a_go_server_sends_hello_retry_request_to_the_engine_offering_no_share(
    go_peers: GoPeers, svids: Path
) -> None:
    groups = [NamedGroup.X25519MLKEM768, NamedGroup.x25519, NamedGroup.secp256r1]
    config = server_config(svid(CLIENT_ID, "ecdsa", svids), groups=groups, shares=[])
    outcome = engine_client_to_go(go_peers, config, svid(SERVER_ID, "ecdsa", svids))
    go = handshake(outcome)
    assert (go["group"], go["hello_retry"]) == ("X25519MLKEM768", True)
    assert outcome.engine[0]["tls_group"] == "X25519MLKEM768"


# --- cipher suites ---------------------------------------------------------------------------


@pytest.mark.parametrize("suite", list(GO_SUITES), ids=lambda s: s.name)
def test_a_go_client_negotiates_each_cipher_suite_the_engine_allows(
    go_peers: GoPeers, svids: Path, suite: CipherSuite
) -> None:
    config = server_config(svid(SERVER_ID, "ecdsa", svids), cipher_suites=(suite,))
    outcome = go_client_to_engine(go_peers, config, svid(CLIENT_ID, "ecdsa", svids))
    assert handshake(outcome)["suite"] == GO_SUITES[suite]
    assert outcome.engine[0]["cipher_suite"] == suite.name


@pytest.mark.parametrize("suite", list(GO_SUITES), ids=lambda s: s.name)
def test_a_go_server_accepts_each_cipher_suite_the_engine_offers(
    go_peers: GoPeers, svids: Path, suite: CipherSuite
) -> None:
    config = server_config(svid(CLIENT_ID, "ecdsa", svids), cipher_suites=(suite,))
    outcome = engine_client_to_go(go_peers, config, svid(SERVER_ID, "ecdsa", svids))
    assert handshake(outcome)["suite"] == GO_SUITES[suite]
    assert outcome.engine[0]["cipher_suite"] == suite.name


# --- leaf keys and signature schemes --------------------------------------------------------


@pytest.mark.parametrize("kind", list(LEAVES))
def test_go_and_the_engine_authenticate_each_other_with_each_leaf_key_both_ways(
    go_peers: GoPeers, svids: Path, kind: str
) -> None:
    scheme, go_key = LEAVES[kind]
    server, client = svid(SERVER_ID, kind, svids), svid(CLIENT_ID, kind, svids)
    # Go client, engine server: each verifies the other's CertificateVerify.
    outcome = go_client_to_engine(go_peers, server_config(server), client)
    go = handshake(outcome)
    assert (go["peer_key"], go["peer_id"]) == (go_key, SERVER_ID)
    assert outcome.engine[0]["signature_scheme"] == scheme.name  # the Go client's signature
    assert outcome.engine[0]["spiffe_id"] == CLIENT_ID
    # Engine client, Go server.
    outcome = engine_client_to_go(go_peers, server_config(client), server)
    go = handshake(outcome)
    assert (go["peer_key"], go["peer_id"]) == (go_key, CLIENT_ID)
    assert outcome.engine[0]["signature_scheme"] == scheme.name  # the Go server's signature
    assert outcome.engine[0]["spiffe_id"] == SERVER_ID


# --- KeyUpdate and resumption ------------------------------------------------------------------


def test_a_go_client_keeps_talking_through_the_engines_key_updates(
    go_peers: GoPeers, svids: Path
) -> None:
    # After every echo the engine updates its keys and asks Go to update too
    # (RFC 8446 §4.6.3 update_requested); 5 lines only pass if both sides switched.
    config = server_config(svid(SERVER_ID, "ecdsa", svids))
    outcome = go_client_to_engine(
        go_peers, config, svid(CLIENT_ID, "ecdsa", svids), "-lines", "5", key_update=True
    )
    handshake(outcome)
    assert outcome.go[-1] == {"event": "done", "lines": 5}


def test_the_engine_keeps_talking_to_a_go_server_through_its_own_key_updates(
    go_peers: GoPeers, svids: Path
) -> None:
    config = server_config(svid(CLIENT_ID, "ecdsa", svids))
    outcome = engine_client_to_go(
        go_peers, config, svid(SERVER_ID, "ecdsa", svids), lines=5, key_update=True
    )
    handshake(outcome)
    assert outcome.go[-1] == {"event": "done", "lines": 5}


def test_the_engine_receives_a_go_servers_session_ticket(go_peers: GoPeers, svids: Path) -> None:
    config = server_config(svid(CLIENT_ID, "ecdsa", svids))
    outcome = engine_client_to_go(go_peers, config, svid(SERVER_ID, "ecdsa", svids))
    assert handshake(outcome)["did_resume"] is False
    assert outcome.engine[0]["tickets"] == 1  # Go sends one NewSessionTicket (§4.6.1)


def test_a_go_client_reconnects_to_the_engine_with_a_full_handshake(
    go_peers: GoPeers, svids: Path
) -> None:
    # The engine's server issues no tickets yet, so Go's session cache stays empty and
    # the second connection is a full, mutually authenticated handshake.
    config = server_config(svid(SERVER_ID, "ecdsa", svids))
    outcome = go_client_to_engine(go_peers, config, svid(CLIENT_ID, "ecdsa", svids), "-resume")
    assert outcome.go_exit == 0, outcome.go_output
    shakes = [line for line in outcome.go if line["event"] == "handshake"]
    assert [s["did_resume"] for s in shakes] == [False, False]
    assert [e["spiffe_id"] for e in outcome.engine] == [CLIENT_ID, CLIENT_ID]


# --- refusals ------------------------------------------------------------------------------------


def test_a_go_client_refuses_an_engine_server_with_an_unexpected_spiffe_id(
    go_peers: GoPeers, svids: Path
) -> None:
    config = server_config(svid(SERVER_ID, "ecdsa", svids))
    wanted = "spiffe://example.org/ns/default/sa/someone-else"
    outcome = go_client_to_engine(
        go_peers, config, svid(CLIENT_ID, "ecdsa", svids), "-expect-id", wanted
    )
    assert outcome.go_exit == 1
    (line,) = outcome.go_output.splitlines()
    assert line == f"tlspeer: handshake: unexpected peer ID {SERVER_ID} (want {wanted})"


def test_the_engine_refuses_a_go_client_from_a_foreign_trust_domain(
    go_peers: GoPeers, svids: Path
) -> None:
    config = server_config(svid(SERVER_ID, "ecdsa", svids))
    outcome = go_client_to_engine(go_peers, config, svid(FOREIGN_ID, "ecdsa", svids))
    assert outcome.go_exit == 1
    # A TLS 1.3 client finishes its handshake before the server has checked its
    # certificate (RFC 8446 §4.4.2): Go learns of the refusal on its first read.
    *_, line = outcome.go_output.splitlines()
    assert line == "tlspeer: read: remote error: tls: unknown certificate authority"
    assert len(outcome.engine) == 1 and "error" in outcome.engine[0]


def test_the_engine_refuses_a_go_client_without_a_certificate_with_certificate_required(
    go_peers: GoPeers, svids: Path
) -> None:
    config = server_config(svid(SERVER_ID, "ecdsa", svids))
    outcome = go_client_to_engine(go_peers, config, svid(CLIENT_ID, "ecdsa", svids), "-no-cert")
    assert outcome.go_exit == 1
    # RFC 8446 §4.4.2.4: an empty client Certificate where one is required.
    *_, line = outcome.go_output.splitlines()
    assert line == "tlspeer: read: remote error: tls: certificate required", outcome.go_output
    assert len(outcome.engine) == 1 and "certificate_required" in outcome.engine[0]["error"]


@pytest.mark.parametrize(("client_auth", "seen_by_go"), [("none", ""), ("request", CLIENT_ID)])
def test_the_engine_connects_to_a_go_server_that_does_not_require_a_client_certificate(
    go_peers: GoPeers, svids: Path, client_auth: str, seen_by_go: str
) -> None:
    config = server_config(svid(CLIENT_ID, "ecdsa", svids))
    outcome = engine_client_to_go(
        go_peers, config, svid(SERVER_ID, "ecdsa", svids), "-client-auth", client_auth
    )
    go = handshake(outcome)
    # Without a CertificateRequest the engine sends no certificate (RFC 8446 §4.4.2).
    assert go["peer_id"] == seen_by_go
    assert outcome.engine[0]["spiffe_id"] == SERVER_ID


@pytest.mark.parametrize("hybrid", [NamedGroup.SecP256r1MLKEM768, NamedGroup.SecP384r1MLKEM1024])
def test_the_engine_retries_for_its_preferred_hybrid_rather_than_take_a_go_clients_x25519(
    go_peers: GoPeers, svids: Path, hybrid: NamedGroup
) -> None:
    # Go supports every hybrid but sends shares only for X25519MLKEM768 and X25519. An
    # engine preferring another hybrid asks for it (HelloRetryRequest) instead of falling
    # back to the classical X25519 share: post-quantum first, whichever hybrid it is.
    groups = [hybrid, NamedGroup.x25519]
    config = server_config(svid(SERVER_ID, "ecdsa", svids), groups=groups)
    outcome = go_client_to_engine(go_peers, config, svid(CLIENT_ID, "ecdsa", svids))
    go = handshake(outcome)
    assert (go["group"], go["hello_retry"]) == (GO_GROUPS[hybrid][1], True)
    assert outcome.engine[0]["tls_group"] == hybrid.name


def test_a_go_server_learns_why_the_engine_refused_its_certificate(
    go_peers: GoPeers, svids: Path
) -> None:
    policy_refuses = server_config(
        svid(CLIENT_ID, "ecdsa", svids), peer_policy=lambda spiffe_id: False
    )
    outcome = engine_client_to_go(go_peers, policy_refuses, svid(SERVER_ID, "ecdsa", svids))
    assert outcome.go_exit == 1
    *_, line = outcome.go_output.splitlines()
    assert line == "tlspeer: handshake: remote error: tls: access denied", outcome.go_output
