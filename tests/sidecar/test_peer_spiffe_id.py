"""One SPIFFE ID from the certificate to the policy.

SPIFFE-ID §2.4 makes the scheme and trust domain case-insensitive (§2.1 asks issuers for
lowercase; the X509-SVID standard adds no rule on case), so `spiffe://Example.ORG/...` in
a URI SAN is `spiffe://example.org/...`: `ca.verify_x509_svid` canonicalises it, and the
engine, the inbound policy, the metrics, the logs and `/config` must all see that same
canonical value. The Trellis CA never issues such a SAN (it canonicalises on issuance);
a peer SVID from another implementation can carry one, so the leaves here are signed by
the real CA intermediate's key with the CA's own leaf extensions, only the SAN's case
changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import tempfile
import urllib.request
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.spiffeid import SpiffeId, TrustDomain
from ca.verify import verify_x509_svid
from ca.x509svid import leaf_extensions
from sidecar.config import Address, InboundConfig, InboundTarget, load_yaml
from sidecar.dataplane import Sidecar
from sidecar.identity import Identity, load_svid_dir
from sidecar.inbound import Inbound
from sidecar.metrics import Metrics
from sidecar.policy import Authorizer, CallerRule

from .dataplane.conftest import CLIENT, ECHO, INTRUDER
from .dataplane.harness import Pki, free_port

T = TypeVar("T")

CLIENT_MIXED = "spiffe://Example.ORG/ns/default/sa/client"
ECHO_MIXED = "spiffe://EXAMPLE.org/ns/default/sa/echo"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def run(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _write_svid(pki: Pki, directory: Path, uri: str) -> tuple[x509.Certificate, ...]:
    """An SVID dir whose leaf's URI SAN is `uri` exactly as given."""
    directory.mkdir(parents=True, exist_ok=True)
    inter = pki.intermediate
    key = ec.generate_private_key(ec.SECP256R1())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
        inter.certificate.public_key()  # type: ignore[arg-type]
    )
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(inter.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    for extension, critical in leaf_extensions(SpiffeId(uri), ski, aki):
        if isinstance(extension, x509.SubjectAlternativeName):
            extension = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)])
        builder = builder.add_extension(extension, critical=critical)
    leaf = builder.sign(inter.private_key, hashes.SHA256())  # type: ignore[arg-type]
    chain = (leaf, inter.certificate)
    (directory / "svid.pem").write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    )
    (directory / "svid.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "bundle.pem").write_bytes(
        pki.root.certificate.public_bytes(serialization.Encoding.PEM)
    )
    return chain


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        self.transport.write_eof()  # type: ignore[attr-defined]
        return True


async def _exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    try:
        data = await reader.read()
    except ConnectionResetError:
        data = b""  # a refused stream reaches the app as a reset
    writer.close()
    return data


def test_an_upper_case_trust_domain_is_one_canonical_id_in_engine_policy_metrics_logs_config(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pki = Pki()
    workdir = Path(tempfile.mkdtemp())
    client_chain = _write_svid(pki, workdir / "client", CLIENT_MIXED)
    _write_svid(pki, workdir / "server", ECHO_MIXED)

    # The CA's verifier accepts the SAN and canonicalises it.
    roots = {TrustDomain("example.org"): (pki.root.certificate,)}
    verified = verify_x509_svid(client_chain, roots, now=dt.datetime.now(dt.UTC))
    assert str(verified.spiffe_id) == CLIENT

    async def scenario() -> tuple[Inbound, set[SpiffeId | None], dict[str, Any]]:
        loop = asyncio.get_running_loop()
        echo = await loop.create_server(_Echo, "127.0.0.1", 0)
        app = Address("127.0.0.1", echo.sockets[0].getsockname()[1])
        identity = Identity()
        identity.update(*load_svid_dir(workdir / "server"))
        inbound = Inbound(
            InboundConfig(
                listen=Address("127.0.0.1", free_port()),
                targets={
                    8080: InboundTarget(8080, app, None),
                    8081: InboundTarget(8081, app, None),
                },
            ),
            identity,
            Metrics(),
            # Rules name the canonical (lowercase) IDs, as every configuration does.
            lambda: Authorizer(
                per_port={
                    8080: (CallerRule(SpiffeId(CLIENT), prefix=False),),
                    8081: (CallerRule(SpiffeId(INTRUDER), prefix=False),),
                }
            ),
        )
        await inbound.start()
        allowed, refused, admin = free_port(), free_port(), free_port()
        port = inbound.config.listen.port
        sidecar = Sidecar(
            load_yaml(
                f"""
svid_dir: {workdir / "client"}
admin: "127.0.0.1:{admin}"
inbound: {{listen: "127.0.0.1:{free_port()}"}}
upstreams:
  - {{name: allowed, listen: "127.0.0.1:{allowed}", target: "echo:8080",
      endpoints: ["127.0.0.1:{port}"], spiffe_ids: ["{ECHO}"]}}
  - {{name: refused, listen: "127.0.0.1:{refused}", target: "echo:8081",
      endpoints: ["127.0.0.1:{port}"], spiffe_ids: ["{ECHO}"]}}
"""
            )
        )
        await sidecar.start()
        try:
            assert await _exchange(allowed, b"hello") == b"hello"
            assert await _exchange(refused, b"hello") == b""
            url = f"http://127.0.0.1:{admin}/config"
            shown = json.loads(await asyncio.to_thread(_get, url))
            return inbound, {s.peer_id for s in inbound.sessions}, shown
        finally:
            await sidecar.drain()
            inbound.drain()
            echo.close()
            with contextlib.suppress(Exception):
                await echo.wait_closed()

    with caplog.at_level(logging.INFO, logger="sidecar"):
        inbound, callers, config = run(scenario())

    # The engine (server side) handed the policy the canonical value...
    assert callers == {SpiffeId(CLIENT)}
    policy = inbound.metrics.policy
    assert policy.labels(decision="allow")._value.get() == 1
    assert policy.labels(decision="deny")._value.get() == 1
    # ...the log line of the refusal names it...
    assert f"denied {CLIENT} -> port 8081" in caplog.text
    assert "Example.ORG" not in caplog.text
    # ...and the client side's engine, policy callback and admin /config show the server's.
    peers = {c["peer"] for pool in config["pools"] for c in pool["connections"]}
    assert peers == {ECHO}
