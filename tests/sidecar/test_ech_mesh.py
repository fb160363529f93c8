"""Encrypted ClientHello (RFC 9849) between two sidecars: what an observer of a pooled
connection sees, and the `tls_ech_total` outcomes.

Two real sidecar data paths joined by real TLS over loopback (``resumption_mesh``), the
caller dialling through a `Tap` that records every byte both ways: the observer. The
service's ECH keys are made by the CA's own code (``ca.server.stek.StekLeader``) and
installed the way the sidecar installs what its agent hands over (``Identity.set_ech``,
as ``Sidecar._ech_changed`` does); tests/sidecar/test_ech_key_distribution.py shows the
agent handing them over.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ca.server.stek import StekLeader
from ca.spiffeid import SpiffeId
from sidecar.echkeys import ech_config_list, ech_key, inner_server_name
from sidecar.stek import EchKeyParts
from sidecar.tls.ech import EXT_ENCRYPTED_CLIENT_HELLO, ECHKey
from sidecar.tls.extensions import ExtensionType, find, pull_server_name

from .dataplane.conftest import CLIENT, ECHO
from .dataplane.harness import Pki
from .resumption_mesh import Mesh, mesh, request
from .tls.grease_support import first_client_hello

T = TypeVar("T")
GET = b"GET /private HTTP/1.1\r\nHost: echo\r\n\r\n"


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def service_ech(spiffe_id: str) -> tuple[list[ECHKey], bytes]:
    """The service's key pairs (current, next) and the config list its callers get."""
    leader = StekLeader(dt.timedelta(hours=1))
    leader.tick(time.time(), {SpiffeId(spiffe_id)})
    (ring,) = leader.rings_for({SpiffeId(spiffe_id)})
    parts = [
        EchKeyParts(k.config_id, k.public_key, k.private_key, k.public_name, k.not_before,
                    k.not_after)
        for k in ring.ech
    ]  # fmt: skip
    ((_, (current,)),) = leader.public_ech()
    public = EchKeyParts(
        current.config_id, current.public_key, b"", current.public_name, current.not_before,
        current.not_after,
    )  # fmt: skip
    return [ech_key(p) for p in parts], ech_config_list([public])


def install(m: Mesh, *, caller_has_config: bool) -> None:
    keys, config_list = service_ech(ECHO)
    m.inbound.identity.set_ech(keys, {})
    m.client.set_ech((), {SpiffeId(ECHO): config_list} if caller_has_config else {})


def test_an_observer_of_a_pooled_connection_sees_only_the_public_name(tmp_path: Path) -> None:
    async def scenario() -> tuple[bytes, bytes, Mesh]:
        async with mesh(Pki(), tmp_path, tap=True) as m:
            install(m, caller_has_config=True)
            assert await request(m.upstream, GET) == b"GET early=-"
            assert m.tap is not None
            await m.forget_connections()
            return bytes(m.tap.sent[0]), bytes(m.tap.received[0]), m

    sent, received, m = run(scenario())
    hello = first_client_hello(sent)
    sni = find(hello.extensions, ExtensionType.server_name)
    assert sni is not None and pull_server_name(sni) == "example.org"  # the public name
    assert find(hello.extensions, EXT_ENCRYPTED_CLIENT_HELLO) is not None
    inner = inner_server_name(SpiffeId(ECHO))
    assert inner == "echo.default.example.org"
    wire = sent + received
    for secret in (inner.encode(), ECHO.encode(), b"sa/echo", CLIENT.encode(), b"sa/client"):
        assert secret not in wire, secret
    assert b"/private" not in wire  # and the request itself, of course
    assert m.server("tls_ech_total", outcome="accepted") == 1
    assert m.server("tls_ech_total", outcome="rejected") == 0


def test_a_caller_without_the_services_config_sends_grease_ech_and_still_connects(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[bytes, Mesh]:
        async with mesh(Pki(), tmp_path, tap=True) as m:
            install(m, caller_has_config=False)
            assert await request(m.upstream, GET) == b"GET early=-"
            assert m.tap is not None
            await m.forget_connections()
            return bytes(m.tap.sent[0]), m

    sent, m = run(scenario())
    hello = first_client_hello(sent)
    # RFC 9849 §6.2: an ECH extension all the same, and no SNI (the mesh sends none).
    assert find(hello.extensions, EXT_ENCRYPTED_CLIENT_HELLO) is not None
    assert find(hello.extensions, ExtensionType.server_name) is None
    assert m.caller("tls_ech_total", outcome="grease") == 1
    # To the serving side GREASE is a config it lacks (§6.2); only the caller counts it.
    assert m.server("tls_ech_total", outcome="rejected") == 0
    assert m.server("tls_ech_total", outcome="accepted") == 0


def test_a_caller_sealing_to_keys_the_service_no_longer_holds_retries_with_its_configs(
    tmp_path: Path,
) -> None:
    """RFC 9849 §6.1.6: the service rejects, completes the outer handshake with its SVID
    (which vouches for the public name, the trust domain) and sends retry_configs; the
    caller's dial ends with ech_required, and the next dial seals to the retry configs
    and is accepted."""

    async def scenario() -> Mesh:
        async with mesh(Pki(), tmp_path) as m:
            keys, _ = service_ech(ECHO)
            _, stale = service_ech(ECHO)  # another CA run's keys: none the service holds
            m.inbound.identity.set_ech(keys, {})
            m.client.set_ech((), {SpiffeId(ECHO): stale})
            for _ in range(3):  # bounded: the rejected dial, then the retry
                try:
                    if await request(m.upstream, GET, timeout=5) == b"GET early=-":
                        break
                except (ConnectionError, asyncio.IncompleteReadError):
                    continue
            else:
                raise AssertionError("no request got through after the rejection")
            return m

    m = run(scenario())
    assert m.caller("tls_ech_total", outcome="rejected") == 1
    assert m.server("tls_ech_total", outcome="accepted") == 1  # the retry


def test_a_resumed_dial_carries_its_0rtt_request_inside_ech_and_names_nothing(
    tmp_path: Path,
) -> None:
    """The pool's fresh dial resumes with a ticket and carries the app's GET as early
    data, all inside ECH: served 0-RTT, and still nothing but the public name in clear."""

    async def scenario() -> tuple[bytes, Mesh]:
        async with mesh(Pki(), tmp_path, tap=True) as m:
            install(m, caller_has_config=True)
            assert await request(m.upstream, GET) == b"GET early=-"  # full, inside ECH
            await m.tickets()
            await m.forget_connections()
            assert await request(m.upstream, GET) == b"GET early=1"  # resumed, 0-RTT
            assert m.tap is not None
            await m.forget_connections()
            return bytes(m.tap.sent[1]) + bytes(m.tap.received[1]), m

    wire, m = run(scenario())
    assert m.server("tls_early_data_total", outcome="accepted") == 1
    assert m.server("tls_resumption_total", kind="ticket") == 1
    assert m.server("tls_ech_total", outcome="accepted") == 2  # both dials
    hello = first_client_hello(wire)
    sni = find(hello.extensions, ExtensionType.server_name)
    assert sni is not None and pull_server_name(sni) == "example.org"
    for secret in (b"echo.default.example.org", ECHO.encode(), CLIENT.encode(), b"/private"):
        assert secret not in wire, secret
