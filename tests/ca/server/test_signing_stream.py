"""``StreamX509SVIDs``: workload SVIDs over one long-lived stream per agent, real gRPC mTLS
on 127.0.0.1 with the server in process.

The rest of the server tests already go through the stream (``CaClient`` prefers it);
these cover what only a stream has: answers matched to requests, a refusal that fails one
request and not the stream, the stream's own endings (ban, shutdown, renewal), a late
answer after a deadline, a CA without the method, and bytes that are not a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import ca.server.app
from ca import KeyAlgorithm, generate_private_key
from ca.api import SERVICE, CaClient, CaError, build_csr
from ca.server.bans import write_ban_list
from ca.server.grpc_shell import make_handler

from .conftest import attested, eventually, run, server_config, serving

REJECTED = "trellis_ca_requests_rejected_total"
ISSUED = "trellis_ca_x509_svid_issued_total"
STREAMS = "trellis_ca_signing_streams"


def csr() -> bytes:
    return build_csr(generate_private_key(KeyAlgorithm.P256))


def hold_signing(server: ca.server.app.CaServer) -> tuple[asyncio.Event, Callable[[], None]]:
    """Make the server's signer wait for the event before signing; call the other to undo."""
    release = asyncio.Event()
    signer = server.service.signer
    sign = signer.sign

    async def held(*args: Any) -> Any:
        await release.wait()
        return await sign(*args)

    setattr(signer, "sign", held)  # noqa: B010
    return release, lambda: setattr(signer, "sign", sign)


def spki(data: bytes) -> bytes:
    from cryptography import x509

    key = x509.load_der_x509_csr(data).public_key()
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "unary"])
def test_both_paths_sign_alike_and_refuse_with_the_same_status(
    ca_dir: Path, entries_file: Path, streaming: bool
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            client.signing_stream = streaming
            good = csr()
            [svid] = await client.batch_sign_csrs([("web", good)])
            assert str(svid.spiffe_id) == "spiffe://example.org/ns/default/sa/web"
            leaf_key = svid.leaf.public_key().public_bytes(
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo
            )
            assert leaf_key == spki(good)
            refusals = [
                ([("db", csr())], "PERMISSION_DENIED"),  # another node's entry
                ([("web", b"\x30\x03\x02\x01\x00")], "INVALID_ARGUMENT"),
                ([], "INVALID_ARGUMENT"),
            ]
            for request, code in refusals:
                with pytest.raises(CaError) as refused:
                    await client.batch_sign_csrs(request)
                assert refused.value.code == code
            assert server.metrics.value(REJECTED, reason="entry-not-authorized") == 1
            assert server.metrics.value(REJECTED, reason="malformed-csr") == 1
            assert server.metrics.value(REJECTED, reason="empty-batch") == 1
            # The stream outlived the refusals: the same one signs on.
            stream = client._stream
            assert len(await client.batch_sign_csrs([("web", csr())])) == 1
            assert client._stream is stream and (stream is not None) is streaming
            assert server.metrics.value(ISSUED, kind="workload") == 2
            await client.close()

    run(scenario())


def test_many_requests_in_flight_on_one_stream_each_get_their_own_answer(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            requests = [csr() for _ in range(40)]
            # Some of them refused, scattered among the rest.
            entries = ["db" if n % 7 == 3 else "web" for n in range(len(requests))]
            results = await asyncio.gather(
                *(client.batch_sign_csrs([(e, c)]) for e, c in zip(entries, requests, strict=True)),
                return_exceptions=True,
            )
            for entry, request, result in zip(entries, requests, results, strict=True):
                if entry == "db":
                    assert isinstance(result, CaError) and result.code == "PERMISSION_DENIED"
                else:
                    assert not isinstance(result, BaseException)
                    leaf = result[0].leaf.public_key()
                    assert leaf.public_bytes(
                        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
                    ) == spki(request)
            assert client._stream is not None and client._stream.broken is None
            await client.close()

    run(scenario())


def test_a_ban_ends_the_open_stream_and_leaves_other_agents_streams_alone(
    ca_dir: Path, entries_file: Path, tmp_path: Path
) -> None:
    bans = tmp_path / "banned.yaml"
    write_ban_list(bans, frozenset())

    async def scenario() -> None:
        config = replace(server_config(ca_dir, entries_file), banned_agents_path=bans)
        async with serving(config) as server:
            banned = await attested(server, "node-a")
            other = await attested(server, "node-b")
            await banned.batch_sign_csrs([("web", csr())])
            await other.batch_sign_csrs([("db", csr())])
            stream = banned._stream
            assert stream is not None
            write_ban_list(bans, frozenset({"node-a"}))
            # The idle stream ends with the ban, before the agent asks for anything.
            await eventually(lambda: stream.broken is not None)
            assert stream.broken is not None and stream.broken.code == "PERMISSION_DENIED"
            assert server.metrics.value(REJECTED, reason="agent-banned") == 1
            with pytest.raises(CaError) as refused:
                await banned.batch_sign_csrs([("web", csr())])
            assert refused.value.code == "PERMISSION_DENIED"
            assert server.metrics.value(REJECTED, reason="agent-banned") == 2
            other_stream = other._stream
            assert len(await other.batch_sign_csrs([("db", csr())])) == 1
            assert other._stream is other_stream
            await banned.close()
            await other.close()

    run(scenario())


def test_renewal_moves_to_a_new_stream_and_the_old_one_ends(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            await client.batch_sign_csrs([("web", csr())])
            old = client._stream
            assert old is not None
            in_flight = asyncio.create_task(client.batch_sign_csrs([("web", csr())]))
            await asyncio.sleep(0)  # the request is written before the renewal
            await client.renew()
            assert len(await in_flight) == 1  # answered on the old stream
            assert len(await client.batch_sign_csrs([("web", csr())])) == 1
            assert client._stream is not old
            # The old stream was half-closed by the agent, so the CA ended it: only the
            # new one is still waiting for requests.
            await eventually(lambda: len(server.signing_streams._reading) == 1)
            assert server.metrics.value(STREAMS) == 1
            await client.close()
            await eventually(lambda: server.metrics.value(STREAMS) == 0)

    run(scenario())


def test_shutdown_ends_an_idle_stream_itself_and_the_agent_reconnects_elsewhere(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        config = server_config(ca_dir, entries_file)
        server = ca.server.app.CaServer(config)
        await server.start()
        client = await attested(server, "node-a")
        await client.batch_sign_csrs([("web", csr())])
        stream = client._stream
        assert stream is not None
        # A long grace: were the stream left to it, stop() would wait it out.
        stopping = asyncio.create_task(server.stop(grace=600))
        await eventually(lambda: stream.broken is not None, timeout=20)
        assert stream.broken is not None
        # OK and end of stream, not CANCELLED at the end of the grace.
        assert stream.broken.code == "UNAVAILABLE"
        assert "ended the signing stream" in stream.broken.detail
        await asyncio.wait_for(stopping, 30)
        await client.close()

    run(scenario())


def test_a_request_past_its_deadline_fails_and_the_next_one_gets_a_fresh_stream(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            await client.batch_sign_csrs([("web", csr())])
            stream = client._stream
            release, restore = hold_signing(server)
            client.timeout = 0.3
            with pytest.raises(CaError) as late:
                await client.batch_sign_csrs([("web", csr())])
            assert late.value.code == "DEADLINE_EXCEEDED"
            release.set()
            restore()
            client.timeout = 10
            fresh = csr()
            [svid] = await client.batch_sign_csrs([("web", fresh)])
            leaf = svid.leaf.public_key().public_bytes(
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo
            )
            assert leaf == spki(fresh)  # not the late answer to the other CSR
            assert client._stream is not stream  # the stalled one was given up
            assert stream is not None and stream.broken is not None
            await client.close()

    run(scenario())


def test_a_ca_without_the_stream_is_asked_with_unary_calls(
    ca_dir: Path, entries_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real server whose handler lacks StreamX509SVIDs, as a CA from before it would."""

    class WithoutStream(grpc.GenericRpcHandler):
        def __init__(self, inner: grpc.GenericRpcHandler) -> None:
            self.inner = inner

        def service(self, details: grpc.HandlerCallDetails) -> Any:
            if details.method == f"/{SERVICE}/StreamX509SVIDs":
                return None
            return self.inner.service(details)

    def older(*args: Any) -> grpc.GenericRpcHandler:
        return WithoutStream(make_handler(*args))

    monkeypatch.setattr(ca.server.app, "make_handler", older)

    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            assert len(await client.batch_sign_csrs([("web", csr())])) == 1
            assert client.signing_stream is False
            with pytest.raises(CaError) as refused:
                await client.batch_sign_csrs([("db", csr())])
            assert refused.value.code == "PERMISSION_DENIED"
            assert len(await client.batch_sign_csrs([("web", csr())])) == 1
            await client.close()

    run(scenario())


def test_bytes_that_are_no_request_end_that_stream_only(ca_dir: Path, entries_file: Path) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            channel = client._main_channel()
            identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731
            raw = channel.stream_stream(
                f"/{SERVICE}/StreamX509SVIDs",
                request_serializer=identity,
                response_deserializer=identity,
            )()
            await raw.write(b"\xff\xff\xff\xff garbage")
            with pytest.raises(grpc.aio.AioRpcError) as broken:
                await raw.read()
            assert broken.value.code() != grpc.StatusCode.OK
            # The agent's own stream, and the server, are unaffected.
            assert len(await client.batch_sign_csrs([("web", csr())])) == 1
            other = await attested(server, "node-b")
            assert len(await other.batch_sign_csrs([("db", csr())])) == 1
            for c in (client, other):
                await c.close()

    run(scenario())


def test_a_client_closed_with_requests_in_flight_fails_them_as_cancelled(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client: CaClient = await attested(server, "node-a")
            release, _ = hold_signing(server)
            pending = asyncio.create_task(client.batch_sign_csrs([("web", csr())]))
            await eventually(lambda: client._stream is not None and bool(client._stream._waiting))
            await client.close()
            with pytest.raises(CaError) as closed:
                await pending
            assert closed.value.code == "CANCELLED"
            release.set()

    run(scenario())


def test_an_agent_svid_that_expires_while_the_stream_is_open_ends_it(
    ca_dir: Path, entries_file: Path
) -> None:
    """TLS checked the certificate when the connection opened; the CA checks it again
    for every request, so a stream cannot outlive the SVID that opened it."""

    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            await client.batch_sign_csrs([("web", csr())])
            stream = client._stream
            svid = client.agent_svid
            assert stream is not None and svid is not None
            after_expiry = svid.expires_at.timestamp() + 60
            server.service._clock = lambda: after_expiry
            with pytest.raises(CaError) as refused:
                await client.batch_sign_csrs([("web", csr())])
            assert refused.value.code == "UNAUTHENTICATED"
            assert stream.broken is not None  # the stream ended, not just the request
            assert server.metrics.value(REJECTED, reason="agent-svid-expired") == 1
            assert server.metrics.value(ISSUED, kind="workload") == 1
            await client.close()

    run(scenario())


def test_a_stream_without_an_agent_svid_is_unauthenticated(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            agent = await attested(server, "node-a")
            svid = agent.agent_svid
            assert svid is not None
            on_attest_port = CaClient(  # grpc never asks for a client certificate there
                server.addresses["attest_listen"],
                trust_roots=server.store.root_cert_path.read_bytes(),
                agent_svid=svid,
            )
            with pytest.raises(CaError) as refused:
                await on_attest_port.batch_sign_csrs([("web", csr())])
            assert refused.value.code == "UNAUTHENTICATED"
            assert on_attest_port.signing_stream  # a refusal, not a missing method
            assert server.metrics.value(REJECTED, reason="no-client-certificate") == 1
            assert len(await agent.batch_sign_csrs([("web", csr())])) == 1
            for c in (agent, on_attest_port):
                await c.close()

    run(scenario())


def test_a_repeated_request_id_is_answered_twice_and_never_confused(
    ca_dir: Path, entries_file: Path
) -> None:
    """IDs are the agent's business: the CA answers each request, replayed or not, under
    the ID it came with (a replayed request is signed again, for the same node's entry)."""
    from ca.api._proto import ca_pb2

    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            raw: Any = client._main_channel().stream_stream(
                f"/{SERVICE}/StreamX509SVIDs",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=ca_pb2.StreamX509SVIDsResponse.FromString,
            )()
            batch = ca_pb2.BatchNewX509SVIDRequest(
                requests=[ca_pb2.X509SVIDRequest(entry_id="web", csr=csr())]
            )
            refused = ca_pb2.BatchNewX509SVIDRequest(
                requests=[ca_pb2.X509SVIDRequest(entry_id="db", csr=csr())]
            )
            for message in (batch, batch, refused):
                await raw.write(ca_pb2.StreamX509SVIDsRequest(id=7, batch=message))
            await raw.done_writing()
            answers = [await raw.read() for _ in range(3)]
            assert [a.id for a in answers] == [7, 7, 7]
            assert [a.code for a in answers] == [0, 0, grpc.StatusCode.PERMISSION_DENIED.value[0]]
            assert answers[2].reason == "entry-not-authorized" and not answers[2].svids
            assert answers[0].svids[0].cert_chain != answers[1].svids[0].cert_chain
            assert await raw.read() is grpc.aio.EOF
            assert await raw.code() == grpc.StatusCode.OK
            await client.close()

    run(scenario())
