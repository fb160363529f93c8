"""Shared fixtures for the real-peer tests (no tests here).

SVIDs come from the project's own CA (`ca`), cut around the real clock because the
peers (OpenSSL, curl, tlslite) check validity against it, and are written to disk the
way `trellis ca issue` writes them: `svid.pem` (leaf, then intermediate), `svid.key`,
`bundle.pem`. Peer processes are started with bounded timeouts and always killed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ca.authority import IntermediateAuthority, RootAuthority
from ca.keys import private_key_pem
from ca.spiffeid import TrustDomain
from sidecar.tls import TLSConfig, TLSError
from sidecar.tls.signatures import PrivateKey

TRUST_DOMAIN = "example.org"
SERVER_ID = "spiffe://example.org/ns/default/sa/server"
CLIENT_ID = "spiffe://example.org/ns/default/sa/client"
FOREIGN_ID = "spiffe://other.org/ns/default/sa/intruder"
PEER_TIMEOUT = 15.0

T = TypeVar("T")


@dataclass(frozen=True)
class Svid:
    """One workload's files on disk, and the same material in memory."""

    directory: Path
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    roots: tuple[x509.Certificate, ...]
    trust_domain: str

    @property
    def cert(self) -> str:
        return str(self.directory / "svid.pem")

    @property
    def key_file(self) -> str:
        return str(self.directory / "svid.key")

    @property
    def bundle(self) -> str:
        return str(self.directory / "bundle.pem")

    @property
    def leaf_file(self) -> str:
        return str(self.directory / "leaf.pem")

    @property
    def intermediate_file(self) -> str:
        return str(self.directory / "intermediate.pem")

    def config(self, **overrides: Any) -> TLSConfig:
        fields: dict[str, Any] = dict(
            rng=os.urandom,
            certificate_chain=self.chain,
            private_key=self.key,
            trust_bundles={self.trust_domain: list(self.roots)},
        )
        fields.update(overrides)
        return TLSConfig(**fields)


@cache
def _workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="trellis-interop-"))
    import atexit

    atexit.register(shutil.rmtree, path, True)
    return path


@cache
def _authority(trust_domain: str) -> tuple[RootAuthority, IntermediateAuthority]:
    now = dt.datetime.now(dt.UTC)
    root = RootAuthority.create(TrustDomain(trust_domain), now=now - dt.timedelta(hours=1))
    return root, root.issue_intermediate("interop", now=now - dt.timedelta(minutes=30))


@cache
def svid(spiffe_id: str, dns: tuple[str, ...] = ("localhost",)) -> Svid:
    """A P-256 X509-SVID from the `ca` package, valid from 5 minutes ago for an hour."""
    trust_domain = spiffe_id.split("/")[2]
    root, intermediate = _authority(trust_domain)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = intermediate.issue_x509_svid(
        spiffe_id,
        key.public_key(),
        now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
        dns_names=list(dns),
    )
    directory = _workdir() / spiffe_id.rsplit("/", 1)[-1] / trust_domain
    directory.mkdir(parents=True)
    (directory / "svid.pem").write_bytes(issued.chain_pem())
    (directory / "svid.key").write_bytes(private_key_pem(key))
    (directory / "svid.key").chmod(0o600)
    from cryptography.hazmat.primitives.serialization import Encoding

    (directory / "bundle.pem").write_bytes(root.certificate.public_bytes(Encoding.PEM))
    (directory / "leaf.pem").write_bytes(issued.chain[0].public_bytes(Encoding.PEM))
    (directory / "intermediate.pem").write_bytes(issued.chain[1].public_bytes(Encoding.PEM))
    return Svid(directory, tuple(issued.chain), key, (root.certificate,), trust_domain)


def server_svid() -> Svid:
    return svid(SERVER_ID)


def client_svid() -> Svid:
    return svid(CLIENT_ID)


def foreign_svid() -> Svid:
    return svid(FOREIGN_ID)


def require(binary: str) -> str:
    """The binary's path; skipped outside CI, and CI turns a skip into a failure."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian: apt-get install {binary})")
    return path


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@dataclass
class Peer:
    """A running peer process with its merged stdout/stderr collected as it arrives."""

    process: asyncio.subprocess.Process
    output: bytearray

    async def wait_for_line(self, marker: bytes, timeout: float = PEER_TIMEOUT) -> bytes:
        """Read until a line containing `marker` appears; return that line."""
        assert self.process.stdout is not None

        async def scan() -> bytes:
            while True:
                line = await self.process.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    output = self.output.decode(errors="replace")
                    raise AssertionError(f"peer exited before {marker!r}; output:\n{output}")
                self.output += line
                if marker in line:
                    return line

        return await asyncio.wait_for(scan(), timeout)

    async def finish(self, timeout: float = PEER_TIMEOUT) -> tuple[int, str]:
        """Wait for exit (killing it after `timeout`) and return (returncode, all output)."""
        assert self.process.stdout is not None
        try:
            rest = await asyncio.wait_for(self.process.stdout.read(), timeout)
            self.output += rest
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(
                f"peer did not exit; output:\n{self.output.decode(errors='replace')}"
            ) from None
        return code, self.output.decode(errors="replace")

    def send(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)

    def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()


@asynccontextmanager
async def peer_process(*argv: str, stdin: bool = True) -> AsyncIterator[Peer]:
    """Start a peer; it is killed on the way out, whatever happened."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield Peer(process, bytearray())
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def openssl_args(*args: str) -> Sequence[str]:
    return (require("openssl"), *args)


@asynccontextmanager
async def tls_echo_server(
    config: TLSConfig, handshake_timeout: float = 10.0
) -> AsyncIterator[tuple[int, list[object]]]:
    """Our server on an ephemeral port: answers one line with "pong SPIFFE-ID GROUP\\n".

    `seen` collects each completed handshake's `HandshakeComplete` and each handshake
    failure (the exception) in order.
    """
    from sidecar.tls.shell import start_tls_server

    seen: list[object] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("tls_negotiated"))
        try:
            await asyncio.wait_for(reader.readline(), PEER_TIMEOUT)
            peer = writer.get_extra_info("spiffe_id")
            writer.write(f"pong {peer} {writer.get_extra_info('tls_group')}\n".encode())
            await writer.drain()
        except (ConnectionError, TimeoutError, TLSError) as exc:
            seen.append(exc)  # after the handshake a TLSError arrives through the stream
        finally:
            writer.close()

    server = await start_tls_server(
        handle,
        "127.0.0.1",
        0,
        config=config,
        handshake_timeout=handshake_timeout,
        on_error=lambda error, _peer: seen.append(error),
    )
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


def trellis_args(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "trellis", *args]


@asynccontextmanager
async def debug_tls_server(
    *extra: str, ident: Svid | None = None
) -> AsyncIterator[tuple[int, Peer]]:
    """`trellis debug tls-server` as a process on an ephemeral port (mTLS unless told)."""
    ident = ident or server_svid()
    argv = trellis_args(
        "debug",
        "tls-server",
        "--port",
        "0",
        "--cert",
        ident.cert,
        "--key",
        ident.key_file,
        *extra,
    )
    async with peer_process(*argv, stdin=False) as server:
        line = await server.wait_for_line(b"listening on")
        port = int(line.split()[2].rsplit(b":", 1)[1])
        yield port, server
