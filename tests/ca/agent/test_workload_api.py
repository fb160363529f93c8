"""The Workload API over a real Unix socket, agent in-process (InProcessUpstream).

Clients here are raw grpcio (``grpc.aio``) so each refusal's exact status is visible; the
py-spiffe interop tests with real processes are in ``test_e2e_pyspiffe.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca import (
    JwtAuthority,
    RootAuthority,
    SpiffeId,
    TrustBundle,
    TrustDomain,
    verify_x509_svid,
)
from ca.agent import Agent
from ca.entries import RegistrationEntry
from ca.workload import HEADER_KEY, HEADER_VALUE, method_path, workload_pb2
from ca.x509svid import load_der_chain
from tests.ca.agent.conftest import WEB, LiveCa, entry, make_upstream, run, running_agent

HEADER = ((HEADER_KEY, HEADER_VALUE),)
pb = workload_pb2


def _target(agent: Agent) -> str:
    return f"unix:{agent.config.socket_path}"


async def _stream_first(
    channel: grpc.aio.Channel, method: str, request: Any, response_type: Any, **kw: Any
) -> Any:
    call = channel.unary_stream(
        method_path(method),
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_type.FromString,
    )(request, timeout=kw.pop("timeout", 10), metadata=kw.pop("metadata", HEADER))
    try:
        async for response in call:
            return response
    finally:
        call.cancel()
    raise AssertionError("stream ended without a response")


async def _unary(channel: grpc.aio.Channel, method: str, request: Any, response_type: Any) -> Any:
    return await channel.unary_unary(
        method_path(method),
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_type.FromString,
    )(request, timeout=10, metadata=HEADER)


def _stream(channel: grpc.aio.Channel, method: str, request: Any, response_type: Any) -> Any:
    return channel.unary_stream(
        method_path(method),
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_type.FromString,
    )(request, timeout=30, metadata=HEADER)


async def _next(stream: Any, timeout: float = 10) -> Any:
    message = await asyncio.wait_for(stream.read(), timeout)
    assert message is not grpc.aio.EOF, "stream ended"
    return message


def test_fetch_x509_svid_serves_the_cached_svid_its_key_and_the_bundle(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> pb.X509SVIDResponse:
        async with (
            running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            response: pb.X509SVIDResponse = await _stream_first(
                channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse
            )
            return response

    response = run(main())
    (svid,) = response.svids
    assert svid.spiffe_id == WEB
    chain = load_der_chain(svid.x509_svid)
    roots = load_der_chain(svid.bundle)
    assert len(chain) == 2  # leaf and intermediate: a leaf alone gives "verify error 21"
    verified = verify_x509_svid(chain, lambda td: roots, now=dt.datetime.now(dt.UTC))
    assert str(verified.spiffe_id) == WEB
    key = serialization.load_der_private_key(svid.x509_svid_key, None)
    assert key.public_key() == chain[0].public_key()


def test_requests_without_the_security_header_are_invalid_argument(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> list[grpc.StatusCode]:
        codes = []
        async with (
            running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            for metadata in ((), (("workload.spiffe.io", "false"),)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _stream_first(
                        channel,
                        "FetchX509SVID",
                        pb.X509SVIDRequest(),
                        pb.X509SVIDResponse,
                        metadata=metadata,
                    )
                codes.append(info.value.code())
            text = (await asyncio.to_thread(_metrics, agent)).decode()
            assert 'code="INVALID_ARGUMENT",method="FetchX509SVID"} 2.0' in text
        return codes

    assert run(main()) == [grpc.StatusCode.INVALID_ARGUMENT] * 2


def _metrics(agent: Agent) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(agent.metrics.registry)


def test_an_unregistered_uid_is_permission_denied(live_ca: LiveCa, short_dir: Path) -> None:
    someone_else = entry(selectors=[f"unix:uid:{os.getuid() + 4242}"])

    async def main() -> grpc.StatusCode:
        async with (
            running_agent(make_upstream(live_ca, [someone_else]), short_dir) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _stream_first(
                    channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse
                )
            return info.value.code()

    assert run(main()) == grpc.StatusCode.PERMISSION_DENIED


def _curl_fetch(socket_path: Path) -> list[str]:
    """A FetchX509SVID made by curl: HTTP/2 with prior knowledge over the Unix socket."""
    return [
        "curl", "-s", "-D", "-", "-o", "/dev/null", "--max-time", "3",
        "--http2-prior-knowledge", "--unix-socket", str(socket_path),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-H", "workload.spiffe.io: true",
        "--data-binary", "@-",  # one empty X509SVIDRequest: 5-byte gRPC frame header
        f"http://localhost{method_path('FetchX509SVID')}",
    ]  # fmt: skip


def test_another_users_process_on_the_same_socket_is_told_apart_by_its_uid(
    live_ca: LiveCa, short_dir: Path
) -> None:
    # The entry is for this test's uid; the caller is curl running as another user
    # (nobody when root, else root is out of reach and the entry names another uid).
    # Either way the kernel's uid, not anything the caller says, decides.
    short_dir.chmod(0o755)
    as_root = os.getuid() == 0
    registered = entry(selectors=[f"unix:uid:{os.getuid() if as_root else 0}"])

    async def main() -> str:
        async with running_agent(make_upstream(live_ca, [registered]), short_dir) as agent:
            proc = await asyncio.create_subprocess_exec(
                *_curl_fetch(agent.config.socket_path),
                user=65534 if as_root else None,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(b"\0\0\0\0\0"), 30)
            return out.decode()

    headers = run(main())
    assert "grpc-status: 7" in headers  # PERMISSION_DENIED
    assert "no identity issued" in headers


def test_oversized_requests_are_refused_and_nothing_else_is_affected(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> tuple[grpc.StatusCode, int]:
        async with (
            running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            huge = pb.ValidateJWTSVIDRequest(audience="a", svid="x" * (128 * 1024))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _unary(channel, "ValidateJWTSVID", huge, pb.ValidateJWTSVIDResponse)
            again = await _stream_first(
                channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse
            )
            return info.value.code(), len(again.svids)

    code, svids = run(main())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert svids == 1


def test_too_many_audiences_are_invalid_argument(live_ca: LiveCa, short_dir: Path) -> None:
    async def main() -> grpc.StatusCode:
        async with (
            running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            request = pb.JWTSVIDRequest(audience=[f"a{i}" for i in range(100)])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _unary(channel, "FetchJWTSVID", request, pb.JWTSVIDResponse)
            return info.value.code()

    assert run(main()) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_connection_that_bypasses_the_front_is_permission_denied(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> grpc.StatusCode:
        # Only root can reach the private listener at all (0700 directory); even then, a
        # connection the front did not make has no credentials and gets nothing.
        async with running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent:
            channel = grpc.aio.insecure_channel(agent.front.internal_address)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _stream_first(
                    channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse
                )
            await channel.close()
            return info.value.code()

    assert run(main()) == grpc.StatusCode.PERMISSION_DENIED


def test_grpcio_reports_the_bound_path_of_a_unix_peer(live_ca: LiveCa, short_dir: Path) -> None:
    # The front relies on this: if a grpcio upgrade stops reporting it, this fails loudly
    # (and the agent fails closed: every caller would be PERMISSION_DENIED).
    async def main() -> list[str]:
        async with running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent:
            seen: list[str] = []
            original = agent.peers.lookup

            def spy(peer: str) -> Any:
                seen.append(peer)
                return original(peer)

            agent.peers.lookup = spy  # type: ignore[method-assign]
            async with grpc.aio.insecure_channel(_target(agent)) as channel:
                await _stream_first(
                    channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse
                )
            return seen

    (peer,) = run(main())
    assert peer.startswith("unix:/") and "/trellis-wl-" in peer


def test_the_x509_stream_sends_the_rotated_svid_before_the_old_one_expires(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> list[x509.Certificate]:
        upstream = make_upstream(live_ca, [entry(ttl=3)])
        async with (
            running_agent(upstream, short_dir) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            stream = _stream(channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
            first = await _next(stream)
            second = await _next(stream, timeout=5)
            stream.cancel()
            return [load_der_chain(r.svids[0].x509_svid)[0] for r in (first, second)]

    old, new = run(main())
    assert old.serial_number != new.serial_number
    assert dt.datetime.now(dt.UTC) < old.not_valid_after_utc  # rotated early, not at expiry
    assert old.public_key() != new.public_key()  # a fresh key per rotation


def test_deleting_the_entry_ends_the_stream_with_permission_denied(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> grpc.StatusCode:
        upstream = make_upstream(live_ca, [entry()])
        async with (
            running_agent(upstream, short_dir) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            stream = _stream(channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
            await _next(stream)
            upstream.set_entries([])
            agent.rotator.poke()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _next(stream)
            return info.value.code()

    assert run(main()) == grpc.StatusCode.PERMISSION_DENIED


def test_bundle_streams_send_the_full_state_then_every_update(
    live_ca: LiveCa, short_dir: Path
) -> None:
    extra = JwtAuthority.generate()

    async def main() -> tuple[Any, Any, Any, Any]:
        upstream = make_upstream(live_ca, [entry()])
        async with (
            running_agent(upstream, short_dir) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            x509s = _stream(
                channel, "FetchX509Bundles", pb.X509BundlesRequest(), pb.X509BundlesResponse
            )
            jwts = _stream(
                channel, "FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse
            )
            x1, j1 = await _next(x509s), await _next(jwts)
            upstream.set_bundle(live_ca.bundle.with_jwt_authority(extra.key_id, extra.public_key))
            j2 = await _next(jwts)
            x509s.cancel()
            jwts.cancel()
            return x1, j1, j2, agent

    x1, j1, j2, _ = run(main())
    assert list(x1.bundles) == ["spiffe://example.org"]
    assert extra.key_id.encode() not in j1.bundles["spiffe://example.org"]
    assert extra.key_id.encode() in j2.bundles["spiffe://example.org"]


def test_jwt_svids_are_issued_for_entitled_ids_and_validated(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> tuple[Any, Any, grpc.StatusCode, grpc.StatusCode, grpc.StatusCode]:
        async with (
            running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            fetched = await _unary(
                channel, "FetchJWTSVID", pb.JWTSVIDRequest(audience=["db"]), pb.JWTSVIDResponse
            )
            token = fetched.svids[0].svid
            valid = await _unary(
                channel,
                "ValidateJWTSVID",
                pb.ValidateJWTSVIDRequest(audience="db", svid=token),
                pb.ValidateJWTSVIDResponse,
            )
            codes = []
            for method, request, response_type in (
                ("FetchJWTSVID", pb.JWTSVIDRequest(), pb.JWTSVIDResponse),
                (
                    "FetchJWTSVID",
                    pb.JWTSVIDRequest(audience=["db"], spiffe_id="spiffe://example.org/other"),
                    pb.JWTSVIDResponse,
                ),
                (
                    "ValidateJWTSVID",
                    pb.ValidateJWTSVIDRequest(audience="not-db", svid=token),
                    pb.ValidateJWTSVIDResponse,
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await _unary(channel, method, request, response_type)
                codes.append(info.value.code())
            return fetched, valid, *codes  # type: ignore[return-value]

    fetched, valid, no_audience, not_entitled, wrong_audience = run(main())
    assert fetched.svids[0].spiffe_id == WEB
    assert valid.spiffe_id == WEB and valid.claims["aud"] == "db"
    assert no_audience == grpc.StatusCode.INVALID_ARGUMENT
    assert not_entitled == grpc.StatusCode.PERMISSION_DENIED
    assert wrong_audience == grpc.StatusCode.INVALID_ARGUMENT


def test_closed_connections_leave_no_credentials_or_socket_files_behind(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> tuple[int, int, list[str]]:
        async with running_agent(make_upstream(live_ca, [entry()]), short_dir) as agent:
            for _ in range(3):
                # A local subchannel pool: closing the channel closes its connection.
                # (Unary calls: after a *cancelled stream* grpcio's client keeps its
                # connection open past channel.close(), with or without the front.)
                local = [("grpc.use_local_subchannel_pool", 1)]
                async with grpc.aio.insecure_channel(_target(agent), options=local) as channel:
                    request = pb.JWTSVIDRequest(audience=["db"])
                    await _unary(channel, "FetchJWTSVID", request, pb.JWTSVIDResponse)
            for _ in range(3):  # and callers that hang up without a word
                raw = socket.socket(socket.AF_UNIX)
                raw.connect(str(agent.config.socket_path))
                raw.close()
            for _ in range(100):
                if agent.front.connections == 0:
                    break
                await asyncio.sleep(0.02)
            private = sorted(p.name for p in agent.front.internal_path.parent.iterdir())
            return agent.front.connections, len(agent.peers), private

    connections, peers, private = run(main())
    assert (connections, peers) == (0, 0)
    assert private == ["grpc.sock", "owner"]  # bound client paths are unlinked at once


def test_federated_bundles_from_the_ca_reach_only_entries_that_federate_with_them(
    live_ca: LiveCa, short_dir: Path
) -> None:
    partner_root = RootAuthority.create(TrustDomain("partner.org"), now=dt.datetime.now(dt.UTC))
    partner_jwt = JwtAuthority.generate()
    partner = TrustBundle(
        TrustDomain("partner.org"),
        (partner_root.certificate,),
        {partner_jwt.key_id: partner_jwt.public_key},
    )
    partner_token = partner_jwt.sign(
        SpiffeId("spiffe://partner.org/ns/shop/sa/client"),
        ["web"],
        now=dt.datetime.now(dt.UTC),
        ttl=dt.timedelta(minutes=5),
    ).token
    partner_der = partner_root.certificate.public_bytes(serialization.Encoding.DER)
    federating = replace(entry(), federates_with=(TrustDomain("partner.org"),))

    async def main(e: RegistrationEntry) -> tuple[Any, Any, Any, Any, Any]:
        upstream = make_upstream(live_ca, [e])
        async with (
            running_agent(upstream, short_dir) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            svids = _stream(channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
            before = await _next(svids)
            upstream.set_federated([partner])
            await asyncio.wait_for(
                _until(lambda: TrustDomain("partner.org") in agent.rotator.cache.federated), 10
            )
            if e.federates_with:
                after = await _next(svids)  # the stream re-sends on the change
            else:
                after = await _stream_first(
                    channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse
                )
            bundles = await _stream_first(
                channel, "FetchX509Bundles", pb.X509BundlesRequest(), pb.X509BundlesResponse
            )
            jwt_bundles = await _stream_first(
                channel, "FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse
            )
            validate = pb.ValidateJWTSVIDRequest(audience="web", svid=partner_token)
            try:
                validated = await _unary(
                    channel, "ValidateJWTSVID", validate, pb.ValidateJWTSVIDResponse
                )
            except grpc.aio.AioRpcError as exc:
                validated = exc.code()
            svids.cancel()
            return before, after, bundles, jwt_bundles, validated

    before, after, bundles, jwt_bundles, validated = run(main(federating))
    assert dict(before.federated_bundles) == {}
    assert dict(after.federated_bundles) == {"spiffe://partner.org": partner_der}
    assert bundles.bundles["spiffe://partner.org"] == partner_der
    assert set(jwt_bundles.bundles) == {"spiffe://example.org", "spiffe://partner.org"}
    assert validated.spiffe_id == "spiffe://partner.org/ns/shop/sa/client"

    before, after, bundles, jwt_bundles, validated = run(main(entry()))
    assert dict(after.federated_bundles) == {}
    assert "spiffe://partner.org" not in bundles.bundles
    assert set(jwt_bundles.bundles) == {"spiffe://example.org"}
    assert validated == grpc.StatusCode.INVALID_ARGUMENT  # no bundle for partner.org


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.02)


def test_each_svid_carries_its_entrys_hint_and_a_hint_change_needs_no_new_svid(
    live_ca: LiveCa, short_dir: Path
) -> None:
    other = "spiffe://example.org/ns/default/sa/web-external"
    internal = replace(entry(entry_id="internal"), hint="internal")
    external = replace(entry(other, entry_id="external"), hint="external")
    plain = entry("spiffe://example.org/ns/default/sa/plain", entry_id="plain")

    async def main() -> tuple[pb.X509SVIDResponse, pb.X509SVIDResponse]:
        upstream = make_upstream(live_ca, [internal, external, plain])
        async with (
            running_agent(upstream, short_dir) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            stream = _stream(channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
            first: pb.X509SVIDResponse = await _next(stream)
            upstream.set_entries([replace(internal, hint="mesh"), external, plain])
            agent.rotator.poke()
            second: pb.X509SVIDResponse = await _next(stream)
            stream.cancel()
            return first, second

    first, second = run(main())
    assert {s.spiffe_id: s.hint for s in first.svids} == {
        WEB: "internal",
        other: "external",
        "spiffe://example.org/ns/default/sa/plain": "",
    }
    assert {s.spiffe_id: s.hint for s in second.svids}[WEB] == "mesh"
    # The hint is not in the certificate: the same SVID, relabelled.
    before = {s.spiffe_id: s.x509_svid for s in first.svids}
    assert all(before[s.spiffe_id] == s.x509_svid for s in second.svids)
