"""``trellis debug tls-server`` / ``tls-client``: Trellis's TLS engine on a real socket.

For conformance and interop runs against curl, ``openssl s_client``/``s_server``, TLS
test suites and the like. The server answers any HTTP/1.x request with 200 and a body
naming what was negotiated (a request line whose blank line never comes is answered
after a short wait; ``GET /keyupdate`` first makes the server send a KeyUpdate that
requests the client's), or with ``--echo`` echoes application data back; the client
prints the negotiated parameters, then the response.
Certificates are what ``trellis ca issue`` writes: ``svid.pem`` (leaf, then
intermediate), ``svid.key`` and ``bundle.pem`` (roots; each root's URI SAN names its
trust domain).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from core.cliargs import seconds as _seconds
from core.errors import CliError
from sidecar.tls import (
    AlertDescription,
    CipherSuite,
    NamedGroup,
    SignatureScheme,
    TLSConfig,
    TLSError,
    file_key_log,
)
from sidecar.tls.shell import PeerAlertError, TLSTransport, open_tls_connection, start_tls_server
from sidecar.tls.signatures import PrivateKey

__all__ = ["register"]

_GROUP_NAMES = {
    "x25519mlkem768": NamedGroup.X25519MLKEM768,
    "secp256r1mlkem768": NamedGroup.SecP256r1MLKEM768,
    "secp384r1mlkem1024": NamedGroup.SecP384r1MLKEM1024,
    "x25519": NamedGroup.x25519,
    "x448": NamedGroup.x448,
    "secp256r1": NamedGroup.secp256r1,
    "p-256": NamedGroup.secp256r1,
    "prime256v1": NamedGroup.secp256r1,
    "secp384r1": NamedGroup.secp384r1,
    "p-384": NamedGroup.secp384r1,
    "secp521r1": NamedGroup.secp521r1,
    "p-521": NamedGroup.secp521r1,
}
_KNOWN_GROUPS = (
    "X25519MLKEM768, SecP256r1MLKEM768, SecP384r1MLKEM1024, X25519, X448,"
    " secp256r1, secp384r1, secp521r1"
)
_MAX_REQUEST_HEAD = 16 * 1024
_REQUEST_TIMEOUT = 10.0
# How long a request line waits for the rest of its head: conformance tools send a bare
# "GET / HTTP/1.0\r\n" and wait for the answer.
_HEADER_WAIT = 1.0
_ECHO_CHUNK = 64 * 1024


def _groups(text: str) -> tuple[NamedGroup, ...]:
    groups = []
    for name in text.split(","):
        group = _GROUP_NAMES.get(name.strip().lower())
        if group is None:
            raise argparse.ArgumentTypeError(
                f"unknown group {name.strip()!r} (known: {_KNOWN_GROUPS})"
            )
        groups.append(group)
    return tuple(dict.fromkeys(groups))


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number")
    return port


def _debug_subcommands(commands: Any) -> Any:
    """`trellis debug`'s subparsers, shared with any other package adding debug aids."""
    existing = commands.choices.get("debug")
    if existing is not None:
        for action in existing._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action
    debug = commands.add_parser("debug", help="debugging aids")
    return debug.add_subparsers(dest="debug_command", metavar="DEBUG_COMMAND", required=True)


def register(commands: Any) -> None:
    sub = _debug_subcommands(commands)

    p = sub.add_parser("tls-server", help="an HTTPS responder on Trellis's TLS 1.3 engine")
    p.add_argument("--port", required=True, type=_port, help="0 picks a free port (printed)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--cert", required=True, type=Path, help="svid.pem: leaf, then intermediate")
    p.add_argument("--key", required=True, type=Path, help="svid.key")
    p.add_argument(
        "--bundle", type=Path, help="bundle.pem: roots to verify client SVIDs against (mTLS)"
    )
    p.add_argument(
        "--require-client-cert",
        action="store_true",
        help="mTLS: request a client SVID and refuse clients without a valid one",
    )
    p.add_argument("--groups", type=_groups, help="e.g. X25519MLKEM768,X25519,secp256r1")
    p.add_argument("--alpn", default="http/1.1", help="comma-separated ALPN protocols")
    p.add_argument("--keylog", type=Path, help="append SSLKEYLOGFILE lines here (secrets!)")
    p.add_argument(
        "--handshake-timeout",
        type=_seconds,
        default="10s",
        help="drop a client whose handshake takes longer",
    )
    p.add_argument(
        "--echo",
        action="store_true",
        help="echo application data back instead of answering HTTP",
    )
    p.set_defaults(handler=cmd_tls_server)

    p = sub.add_parser("tls-client", help="connect with Trellis's TLS engine, print the result")
    p.add_argument("url", help="https://HOST:PORT/PATH")
    p.add_argument("--cert", type=Path, help="svid.pem: leaf, then intermediate")
    p.add_argument("--key", type=Path, help="svid.key")
    p.add_argument("--bundle", type=Path, help="bundle.pem: roots to verify the server against")
    p.add_argument("--insecure", action="store_true", help="do not verify the server")
    p.add_argument("--groups", type=_groups, help="e.g. X25519MLKEM768,X25519,secp256r1")
    p.add_argument("--server-name", help="SNI (default: the URL's host)")
    p.add_argument("--alpn", default="http/1.1", help="comma-separated ALPN protocols")
    p.add_argument("--keylog", type=Path, help="append SSLKEYLOGFILE lines here (secrets!)")
    p.add_argument(
        "--timeout", type=_seconds, default="10s", help="give up on the handshake or reply after"
    )
    p.set_defaults(handler=cmd_tls_client)


# --- configuration from files ----------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _load_chain(path: Path) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(_read(path, "certificate"))
    except ValueError as exc:
        raise CliError(f"{path} holds no PEM certificate") from exc
    return chain


def _load_key(path: Path) -> PrivateKey:
    from ca.keys import KeyMaterialError, load_private_key

    try:
        key = load_private_key(_read(path, "key"), what=str(path))
    except KeyMaterialError as exc:
        raise CliError(str(exc)) from exc
    if not isinstance(key, PrivateKey):
        raise CliError(f"{path}: {type(key).__name__} keys are not supported by the TLS engine")
    return key


def _load_bundles(path: Path) -> dict[str, list[x509.Certificate]]:
    """Roots grouped by the trust domain their URI SAN names."""
    from ca.x509svid import SvidError, spiffe_id_of

    bundles: dict[str, list[x509.Certificate]] = {}
    for root in _load_chain(path):
        try:
            trust_domain = spiffe_id_of(root).trust_domain.name
        except (SvidError, ValueError) as exc:
            raise CliError(
                f"{path}: root {root.subject.rfc4514_string()!r} names no trust domain"
                " (a SPIFFE root carries spiffe://TRUST-DOMAIN as its URI SAN)"
            ) from exc
        bundles.setdefault(trust_domain, []).append(root)
    return bundles


def _config(args: argparse.Namespace, *, server: bool) -> TLSConfig:
    fields: dict[str, Any] = {"rng": os.urandom}
    if (args.cert is None) != (args.key is None):
        raise CliError("--cert and --key go together")
    if args.cert is not None:
        chain = _load_chain(args.cert)
        key = _load_key(args.key)
        if chain[0].public_key() != key.public_key():
            raise CliError(f"{args.key} is not the key of the first certificate in {args.cert}")
        fields.update(certificate_chain=tuple(chain), private_key=key)
    if args.bundle is not None:
        fields["trust_bundles"] = _load_bundles(args.bundle)
    if server:
        if args.require_client_cert and args.bundle is None:
            raise CliError("--require-client-cert needs --bundle to verify clients against")
        fields["require_client_certificate"] = args.require_client_cert
        fields["verify_peer"] = args.require_client_cert
    else:
        if args.bundle is None and not args.insecure:
            raise CliError("give --bundle to verify the server, or --insecure")
        fields["verify_peer"] = not args.insecure
    if args.groups:
        fields["groups"] = args.groups
        shares = [g for g in (NamedGroup.X25519MLKEM768, NamedGroup.x25519) if g in args.groups]
        fields["key_share_groups"] = tuple(shares) or args.groups[:1]
    if args.alpn:
        fields["alpn_protocols"] = tuple(p for p in args.alpn.split(",") if p)
    if args.keylog is not None:
        fields["key_log"] = file_key_log(str(args.keylog))
    try:
        return TLSConfig(**fields)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _enum_name(enum: Any, value: int | None) -> str:
    if value is None:
        return "-"
    try:
        return str(enum(value).name)
    except ValueError:
        return f"0x{value:04x}"


def _summary(writer: asyncio.StreamWriter) -> list[tuple[str, str]]:
    info = writer.get_extra_info("tls_negotiated")
    return [
        ("version", "TLSv1.3"),
        ("cipher_suite", "TLS_" + _enum_name(CipherSuite, info.cipher_suite)),
        ("group", _enum_name(NamedGroup, info.group)),
        # The peer's CertificateVerify scheme; 0 when it sent no certificate.
        ("signature_scheme", _enum_name(SignatureScheme, info.signature_scheme or None)),
        ("alpn", info.alpn_protocol or "-"),
        ("peer_spiffe_id", str(info.peer_spiffe_id or "-")),
    ]


def _describe(error: BaseException) -> str:
    if isinstance(error, TLSError):
        return f"we sent alert {error.alert.name} ({error.reason or '-'})"
    if isinstance(error, PeerAlertError):
        alert = error.alert
        name = alert.name if isinstance(alert, AlertDescription) else str(alert)
        return f"the peer sent alert {name}"
    if isinstance(error, TimeoutError):
        return str(error) or "timed out"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error)


# --- tls-server -------------------------------------------------------------------------


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers up to the blank line, or whatever came of them
    within _HEADER_WAIT of the last line (or before EOF)."""
    async with asyncio.timeout(_REQUEST_TIMEOUT):
        head = await reader.readuntil(b"\n")
        while len(head) <= _MAX_REQUEST_HEAD:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), _HEADER_WAIT)
            except TimeoutError:
                break  # no blank line is coming: answer what we have
            except asyncio.IncompleteReadError:
                break  # the client half-closed after its request line
            if line in (b"\r\n", b"\n"):
                break
            head += line
    return head


def _send_key_update(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if isinstance(transport, TLSTransport):
        # RFC 8446 §4.6.3: update_requested, so the client must answer with its own.
        transport.update_key(request_peer_update=True)


async def _respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await _read_head(reader)
        request_line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            status, body = "400 Bad Request", "not an HTTP/1.x request\n"
        else:
            status = "200 OK"
            path = urllib.parse.urlsplit(parts[1]).path
            if path == "/keyupdate":
                _send_key_update(writer)
            body = "".join(f"{k}: {v}\n" for k, v in _summary(writer))
            body = f"trellis debug tls-server\nrequest: {parts[0]} {parts[1]}\n{body}"
            if path == "/keyupdate":
                body += "key_update: sent, update_requested\n"
        payload = body.encode()
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        pass  # a client that never sends a request line gets nothing
    except (ConnectionError, TLSError) as exc:
        logging.getLogger(__name__).info("connection ended: %s", _describe(exc))
    finally:
        writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Application data back as it comes, until the client closes (or goes quiet for
    _REQUEST_TIMEOUT)."""
    try:
        while data := await asyncio.wait_for(reader.read(_ECHO_CHUNK), _REQUEST_TIMEOUT):
            writer.write(data)
            await writer.drain()
    except TimeoutError:
        pass
    except (ConnectionError, TLSError) as exc:
        logging.getLogger(__name__).info("connection ended: %s", _describe(exc))
    finally:
        writer.close()


async def _serve(args: argparse.Namespace, config: TLSConfig) -> None:
    def handshake_failed(error: BaseException, peer: Any) -> None:
        print(f"trellis: {peer}: {_describe(error)}", file=sys.stderr, flush=True)

    try:
        server = await start_tls_server(
            _echo if args.echo else _respond,
            args.host,
            args.port,
            config=config,
            limit=_MAX_REQUEST_HEAD,
            handshake_timeout=args.handshake_timeout,
            on_error=handshake_failed,
        )
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from exc
    async with server:
        host, port = server.sockets[0].getsockname()[:2]
        groups = ",".join(g.name for g in config.groups)
        mode = ", echo" if args.echo else ""
        print(f"listening on {host}:{port} (groups {groups}{mode})", flush=True)
        await server.serve_forever()


def cmd_tls_server(args: argparse.Namespace) -> int:
    config = _config(args, server=True)
    if not config.certificate_chain:
        raise CliError("a server needs --cert and --key")
    asyncio.run(_serve(args, config))
    return 0


# --- tls-client -------------------------------------------------------------------------


def _parse_url(url: str) -> tuple[str, int, str]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise CliError(f"{url!r} is not an https:// URL")
    try:
        port = parsed.port or 443
    except ValueError as exc:
        raise CliError(f"{url!r}: {exc}") from exc
    path = parsed.path or "/"
    if parsed.query:
        path += "?" + parsed.query
    return parsed.hostname, port, path


async def _fetch(args: argparse.Namespace, config: TLSConfig) -> Sequence[tuple[str, str]]:
    host, port, path = _parse_url(args.url)
    try:
        reader, writer = await asyncio.wait_for(
            open_tls_connection(
                host,
                port,
                config=config,
                server_name=args.server_name or host,
                handshake_timeout=args.timeout,
            ),
            args.timeout,
        )
    except (OSError, TLSError, TimeoutError) as exc:
        raise CliError(f"{host}:{port}: {_describe(exc)}") from exc
    summary = _summary(writer)
    for key, value in summary:
        print(f"{key}: {value}", flush=True)
    authority = host if port == 443 else f"{host}:{port}"
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: trellis-debug\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    try:
        response = await asyncio.wait_for(reader.read(), args.timeout)
    except (OSError, TLSError, TimeoutError) as exc:
        raise CliError(f"reading the response: {_describe(exc)}") from exc
    finally:
        writer.close()
    print()
    sys.stdout.write(response.decode("utf-8", errors="replace"))
    sys.stdout.flush()
    return summary


def cmd_tls_client(args: argparse.Namespace) -> int:
    config = _config(args, server=False)
    asyncio.run(_fetch(args, config))
    return 0
