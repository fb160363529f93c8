"""The CA server over real gRPC mutual TLS on 127.0.0.1, in process.

Each refusal test checks three things: the gRPC status, the rejection metric with its
reason, and that the same agent (or another) is still served normally afterwards.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca import KeyAlgorithm, generate_private_key, validate_jwt_svid, verify_x509_svid
from ca.api import CaClient, CaError, build_csr
from ca.server.app import CaServer
from ca.server.attestation import JoinTokenRecord, hash_join_token, new_join_token
from ca.store import CaStore

from .conftest import attested, client_for, eventually, run, server_config, serving

REJECTED = "trellis_ca_requests_rejected_total"


def rejected(server: CaServer, reason: str) -> float:
    return server.metrics.value(REJECTED, reason=reason)


def key() -> object:
    return generate_private_key(KeyAlgorithm.P256)


def roots(server: CaServer) -> dict[object, list[x509.Certificate]]:
    return {server.trust_domain: list(server.bundles.current.x509_authorities)}


def test_attested_agent_gets_its_svid_entries_and_workload_svids(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            identity = client.agent_svid
            assert identity is not None
            assert str(identity.spiffe_id) == "spiffe://example.org/trellis/agent/node-a"
            now = dt.datetime.now(dt.UTC)
            verify_x509_svid(identity.chain, roots(server), now=now)

            entries = await client.fetch_entries()
            assert sorted(e.entry_id for e in entries) == ["everywhere", "web"]

            svids = await client.batch_new_x509_svids([("web", key()), ("everywhere", key())])
            assert [str(s.spiffe_id) for s in svids] == [
                "spiffe://example.org/ns/default/sa/web",
                "spiffe://example.org/ns/default/sa/logger",
            ]
            verified = verify_x509_svid(svids[0].chain, roots(server), now=now)
            assert str(verified.spiffe_id).endswith("/sa/web")
            san = svids[0].leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert san.value.get_values_for_type(x509.DNSName) == ["web.default.svc"]
            assert svids[0].private_key is not None
            assert server.metrics.value("trellis_ca_x509_svid_issued_total", kind="workload") == 2
            assert server.metrics.value("trellis_ca_attested_agents") == 1
            await client.close()

    run(scenario())


def test_jwt_svid_validates_against_the_bundle_the_server_hands_out(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            jwt = await client.new_jwt_svid("web", ["payments"])
            bundle = server.bundles.current
            svid = validate_jwt_svid(
                jwt.token,
                "payments",
                lambda td: bundle.jwt_authorities if td == bundle.trust_domain else None,
                now=dt.datetime.now(dt.UTC),
            )
            assert str(svid.spiffe_id).endswith("/sa/web")
            assert server.metrics.value("trellis_ca_jwt_svid_issued_total") == 1
            with pytest.raises(CaError) as refused:
                await client.new_jwt_svid("web", [])
            assert refused.value.code == "INVALID_ARGUMENT"
            await client.close()

    run(scenario())


def test_agent_renews_with_its_current_svid_and_gets_a_new_key(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            first = client.agent_svid
            renewed = await client.renew()
            assert renewed.node_name == "node-a"
            assert first is not None and renewed.svid.spiffe_id == first.spiffe_id
            assert renewed.svid.leaf.public_key() != first.leaf.public_key()
            # the renewed identity is the one in use from now on
            assert len(await client.fetch_entries()) == 2
            await client.close()

    run(scenario())


def test_restarted_agent_resumes_with_a_stored_svid_without_attesting(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            first = await attested(server, "node-b")
            kept = first.agent_svid
            await first.close()
            again = client_for(server, agent_svid=kept)
            assert [e.entry_id for e in await again.fetch_entries()] == ["db", "everywhere"]
            await again.close()

    run(scenario())


# -- join tokens ---------------------------------------------------------------------------


def test_forged_join_token_is_unauthenticated_and_counted(ca_dir: Path) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir)) as server:
            client = client_for(server)
            with pytest.raises(CaError) as refused:
                await client.attest_with_join_token(new_join_token())
            assert refused.value.code == "UNAUTHENTICATED"
            assert not refused.value.retryable
            assert rejected(server, "join-token-invalid") == 1
            assert server.metrics.value("trellis_ca_x509_svid_issued_total", kind="agent") == 0
            # nothing else affected: a genuine token still works
            good = await attested(server, "node-a")
            await good.close()

    run(scenario())


def test_replayed_join_token_is_refused_after_its_first_use(ca_dir: Path) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir)) as server:
            token = server.join_tokens.issue("node-a", now=time.time(), ttl=60)
            first = client_for(server)
            await first.attest_with_join_token(token)
            replay = client_for(server)
            with pytest.raises(CaError) as refused:
                await replay.attest_with_join_token(token)
            assert refused.value.code == "UNAUTHENTICATED"
            assert rejected(server, "join-token-reused") == 1
            assert replay.agent_svid is None
            assert len(await first.fetch_entries()) == 0  # the first agent is unaffected
            await first.close()

    run(scenario())


def test_expired_join_token_is_refused(ca_dir: Path) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir)) as server:
            token = new_join_token()
            server.join_tokens.add(
                hash_join_token(token), JoinTokenRecord("node-a", time.time() - 1)
            )
            with pytest.raises(CaError) as refused:
                await client_for(server).attest_with_join_token(token)
            assert refused.value.code == "UNAUTHENTICATED"
            assert rejected(server, "join-token-expired") == 1

    run(scenario())


def test_token_created_by_the_cli_store_is_accepted_once_and_its_file_removed(
    ca_dir: Path,
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir)) as server:
            token, _ = server.token_store.create("node-c", ttl=60)
            files = list(server.token_store.directory.glob("*.json"))
            assert [f.stem for f in files] == [hash_join_token(token)]
            assert token not in files[0].read_text()  # only the hash is stored
            assert oct(files[0].stat().st_mode & 0o777) == "0o600"
            identity = await client_for(server).attest_with_join_token(token)
            assert identity.node_name == "node-c"
            assert not files[0].exists()
            with pytest.raises(CaError):
                await client_for(server).attest_with_join_token(token)

    run(scenario())


def test_psat_attestation_is_unavailable_when_not_configured(ca_dir: Path) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir)) as server:
            with pytest.raises(CaError) as refused:
                await client_for(server).attest_with_psat("a.b.c")
            assert refused.value.code == "UNAVAILABLE"
            assert rejected(server, "psat-not-configured") == 1

    run(scenario())


# -- authorisation -------------------------------------------------------------------------


def test_agent_asking_for_another_nodes_entry_is_permission_denied(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            for request in ([("db", key())], [("web", key()), ("db", key())], [("nope", key())]):
                with pytest.raises(CaError) as refused:
                    await client.batch_new_x509_svids(request)
                assert refused.value.code == "PERMISSION_DENIED"
            with pytest.raises(CaError) as refused:
                await client.new_jwt_svid("db", ["x"])
            assert refused.value.code == "PERMISSION_DENIED"
            assert rejected(server, "entry-not-authorized") == 4
            # all or nothing: the mixed batch signed nothing
            assert server.metrics.value("trellis_ca_x509_svid_issued_total", kind="workload") == 0
            assert len(await client.batch_new_x509_svids([("web", key())])) == 1
            await client.close()

    run(scenario())


def test_csr_naming_a_spiffe_id_outside_the_entry_is_permission_denied(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            stolen = build_csr(key(), "spiffe://example.org/ns/default/sa/db")  # type: ignore[arg-type]
            with pytest.raises(CaError) as refused:
                await client.batch_sign_csrs([("web", stolen)])
            assert refused.value.code == "PERMISSION_DENIED"
            assert rejected(server, "csr-spiffe-id-mismatch") == 1
            matching = build_csr(key(), "spiffe://example.org/ns/default/sa/web")  # type: ignore[arg-type]
            assert len(await client.batch_sign_csrs([("web", matching)])) == 1
            await client.close()

    run(scenario())


def test_csr_with_a_bad_signature_is_invalid_argument(ca_dir: Path, entries_file: Path) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            csr = bytearray(build_csr(key()))  # type: ignore[arg-type]
            csr[-5] ^= 0x01  # inside the signature BIT STRING
            with pytest.raises(CaError) as refused:
                await client.batch_sign_csrs([("web", bytes(csr))])
            assert refused.value.code == "INVALID_ARGUMENT"
            with pytest.raises(CaError) as garbage:
                await client.batch_sign_csrs([("web", b"\x30\x03\x02\x01\x00")])
            assert garbage.value.code == "INVALID_ARGUMENT"
            assert rejected(server, "csr-signature-invalid") == 1
            assert rejected(server, "malformed-csr") == 1
            assert len(await client.batch_new_x509_svids([("web", key())])) == 1
            await client.close()

    run(scenario())


def test_calls_without_an_agent_svid_are_unauthenticated(ca_dir: Path, entries_file: Path) -> None:
    """The attestation listener has no client certificate: nothing but AttestAgent works
    there, and a workload SVID (not an agent's) is refused on the mTLS listener."""

    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            agent = await attested(server, "node-a")
            svid = agent.agent_svid
            assert svid is not None
            on_attest_port = CaClient(
                server.addresses["attest_listen"],
                trust_roots=server.store.root_cert_path.read_bytes(),
                agent_svid=svid,
            )
            # grpc's attestation listener never asks for a client certificate
            with pytest.raises(CaError) as refused:
                await on_attest_port.fetch_entries()
            assert refused.value.code == "UNAUTHENTICATED"
            assert rejected(server, "no-client-certificate") == 1
            workload = (await agent.batch_new_x509_svids([("web", key())]))[0]
            as_workload = client_for(server, agent_svid=workload)
            with pytest.raises(CaError) as refused:
                await as_workload.fetch_entries()
            assert refused.value.code == "UNAUTHENTICATED"
            assert rejected(server, "not-an-agent") == 1
            for c in (agent, on_attest_port, as_workload):
                await c.close()

    run(scenario())


# -- limits --------------------------------------------------------------------------------


def test_oversized_request_is_resource_exhausted_and_counted(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        config = server_config(ca_dir, entries_file, max_request_bytes=32 * 1024)
        async with serving(config) as server:
            client = await attested(server, "node-a")
            csr = build_csr(key())  # type: ignore[arg-type]
            big = [("web", csr)] * (40 * 1024 // len(csr))
            with pytest.raises(CaError) as refused:
                await client.batch_sign_csrs(big)
            assert refused.value.code == "RESOURCE_EXHAUSTED"
            assert rejected(server, "request-too-large") == 1
            assert server.metrics.value("trellis_ca_x509_svid_issued_total", kind="workload") == 0
            assert len(await client.batch_sign_csrs([("web", csr)])) == 1
            await client.close()

    run(scenario())


def test_batch_over_the_count_limit_is_resource_exhausted(ca_dir: Path, entries_file: Path) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file, max_batch=3)) as server:
            client = await attested(server, "node-a")
            csr = build_csr(key())  # type: ignore[arg-type]
            with pytest.raises(CaError) as refused:
                await client.batch_sign_csrs([("web", csr)] * 4)
            assert refused.value.code == "RESOURCE_EXHAUSTED"
            assert rejected(server, "batch-too-large") == 1
            await client.close()

    run(scenario())


def test_the_batch_limit_is_told_on_attestation_renewal_and_entry_fetches(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file, max_batch=3)) as server:
            client = client_for(server)
            assert client.max_batch is None
            token = server.join_tokens.issue("node-a", now=time.time(), ttl=600)
            await client.attest_with_join_token(token)
            assert client.max_batch == 3
            client.max_batch = None
            await client.renew()
            assert client.max_batch == 3
            # A restarted agent with its saved SVID neither attests nor renews first.
            saved = client_for(server, agent_svid=client.agent_svid)
            await saved.fetch_entries()
            assert saved.max_batch == 3
            # Exactly the limit is accepted.
            csr = build_csr(key())  # type: ignore[arg-type]
            assert len(await saved.batch_sign_csrs([("web", csr)] * 3)) == 3
            await client.close()
            await saved.close()

    run(scenario())


def test_agent_over_its_rate_limit_is_throttled_while_other_agents_are_not(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        config = server_config(ca_dir, entries_file, agent_rate=0.5, agent_burst=3)
        async with serving(config) as server:
            noisy = await attested(server, "node-a")
            quiet = await attested(server, "node-b")
            csr = build_csr(key())  # type: ignore[arg-type]
            await noisy.batch_sign_csrs([("web", csr)] * 3)
            with pytest.raises(CaError) as refused:
                await noisy.batch_sign_csrs([("web", csr)])
            assert refused.value.code == "RESOURCE_EXHAUSTED"
            assert refused.value.retryable
            assert rejected(server, "rate-limited") == 1
            assert len(await quiet.batch_sign_csrs([("db", csr)])) == 1
            for c in (noisy, quiet):
                await c.close()

    run(scenario())


def test_attestation_attempts_are_rate_limited_per_address(ca_dir: Path) -> None:
    async def scenario() -> None:
        config = server_config(ca_dir, attest_rate=0.1, attest_burst=2)
        async with serving(config) as server:
            client = client_for(server)
            codes = []
            for _ in range(3):
                try:
                    await client.attest_with_join_token(new_join_token())
                except CaError as exc:
                    codes.append(exc.code)
            assert codes == ["UNAUTHENTICATED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"]
            assert rejected(server, "rate-limited") == 1

    run(scenario())


# -- changes while running -----------------------------------------------------------------


def test_entries_file_changes_reach_fetch_entries_without_a_restart(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-b")
            before = await client.fetch_entries()
            entries_file.write_text(
                entries_file.read_text() + "  - id: cache\n"
                "    spiffe_id: spiffe://example.org/ns/default/sa/cache\n"
                "    selectors: [unix:uid:1002]\n"
                "    node: node-b\n"
            )
            await eventually(lambda: server.entries.current().get("cache") is not None)
            after = await client.fetch_entries()
            assert after.revision != before.revision
            assert sorted(e.entry_id for e in after) == ["cache", "db", "everywhere"]
            assert len(await client.batch_new_x509_svids([("cache", key())])) == 1

            # a broken edit keeps the last good entries in force and is counted
            entries_file.write_text("entries: [{spiffe_id: 7}]\n")
            await eventually(
                lambda: server.metrics.value("trellis_ca_entries_reload_errors_total") == 1
            )
            assert (await client.fetch_entries()).revision == after.revision
            await client.close()

    run(scenario())


def test_bundle_watch_sends_the_bundle_at_once_and_again_after_a_change(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            stream = client.watch_bundle()
            first = await stream.__anext__()
            assert first.same_content(server.bundles.current)
            store = CaStore(ca_dir)
            extra = generate_private_key(KeyAlgorithm.P256)
            bundle = store.load_bundle().with_jwt_authority("rotated-key", extra.public_key())  # type: ignore[arg-type]
            store.save_bundle(bundle)
            second = await stream.__anext__()
            assert "rotated-key" in second.jwt_authorities
            assert second.sequence > first.sequence
            await stream.aclose()
            await client.close()

    run(scenario())


def test_bundle_endpoint_serves_the_spiffe_bundle_over_https_with_the_server_svid(
    ca_dir: Path,
) -> None:
    import json
    import ssl
    import urllib.request

    async def scenario() -> None:
        async with serving(server_config(ca_dir)) as server:
            context = ssl.create_default_context(cafile=str(server.store.root_cert_path))
            port = server.addresses["bundle_listen"].rsplit(":", 1)[1]
            url = f"https://localhost:{port}/"

            def fetch() -> tuple[bytes, bytes]:
                with urllib.request.urlopen(url, context=context, timeout=5) as response:
                    peer = response.fp.raw._sock.getpeercert(binary_form=True)
                    return response.read(), peer

            import asyncio

            body, peer_der = await asyncio.to_thread(fetch)
            doc = json.loads(body)
            assert {k["use"] for k in doc["keys"]} == {"x509-svid", "jwt-svid"}
            assert doc["spiffe_sequence"] == server.bundles.current.sequence
            leaf = x509.load_der_x509_certificate(peer_der)
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
                "spiffe://example.org/trellis/ca/west"
            ]

    run(scenario())


def test_metrics_carry_trust_domain_and_cluster_but_no_workload_ids(
    ca_dir: Path, entries_file: Path
) -> None:
    import asyncio
    import urllib.request

    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            await client.batch_new_x509_svids([("web", key())])
            with pytest.raises(CaError):
                await client.batch_new_x509_svids([("db", key())])
            url = f"http://{server.addresses['metrics_listen']}/metrics"

            def scrape() -> str:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.read().decode()

            text = await asyncio.to_thread(scrape)
            await client.close()
        for name in (
            "trellis_ca_x509_svid_issued_total",
            "trellis_ca_jwt_svid_issued_total",
            "trellis_ca_sign_duration_seconds_bucket",
            "trellis_ca_requests_rejected_total",
            "trellis_ca_authority_expiry_timestamp_seconds",
            "trellis_ca_attested_agents",
        ):
            assert name in text, name
        samples = [line for line in text.splitlines() if line.startswith("trellis_ca_")]
        assert all('trust_domain="example.org"' in s and 'cluster="west"' in s for s in samples)
        assert "spiffe://" not in text and "node-a" not in text
        assert 'authority="intermediate"' in text and 'authority="root"' in text

    run(scenario())


def test_server_svid_names_the_cluster_ca_and_chains_to_the_root(ca_dir: Path) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir)) as server:
            creds = server._creds
            verified = verify_x509_svid(
                creds.svid.chain, roots(server), now=dt.datetime.now(dt.UTC)
            )
            assert str(verified.spiffe_id) == "spiffe://example.org/trellis/ca/west"
            san = creds.svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert "trellis-ca" in san.value.get_values_for_type(x509.DNSName)
            assert b"PRIVATE KEY" not in creds.chain_pem
            assert creds.svid.leaf.public_bytes(serialization.Encoding.PEM) in creds.chain_pem

    run(scenario())


def test_signing_in_worker_processes_gives_the_same_svids_and_refusals(
    ca_dir: Path, entries_file: Path
) -> None:
    from dataclasses import replace

    from ca.server.signer import ProcessPoolSigner

    async def scenario() -> None:
        config = replace(server_config(ca_dir, entries_file), sign_workers=2)
        async with serving(config) as server:
            signer = server.service.signer
            assert isinstance(signer, ProcessPoolSigner)
            client = await attested(server, "node-a")
            # 20 CSRs: split between both workers, answered in request order.
            wanted = [("web", key()), ("everywhere", key())] * 10
            svids = await client.batch_new_x509_svids(wanted)  # type: ignore[arg-type]
            now = dt.datetime.now(dt.UTC)
            assert [
                str(verify_x509_svid(s.chain, roots(server), now=now).spiffe_id) for s in svids
            ] == [
                "spiffe://example.org/ns/default/sa/web",
                "spiffe://example.org/ns/default/sa/logger",
            ] * 10
            assert (signer.batches_in_workers, signer.batches_inline) == (1, 0)
            # One CSR while the workers are idle: signed on the event loop, same profile.
            (alone,) = await client.batch_new_x509_svids([("web", key())])  # type: ignore[list-item]
            assert str(verify_x509_svid(alone.chain, roots(server), now=now).spiffe_id) == (
                "spiffe://example.org/ns/default/sa/web"
            )
            assert (signer.batches_in_workers, signer.batches_inline) == (1, 1)
            # A stolen SPIFFE ID is refused on either path, and the whole batch with it.
            stolen = build_csr(key(), "spiffe://example.org/ns/default/sa/db")  # type: ignore[arg-type]
            honest = build_csr(key())  # type: ignore[arg-type]
            for batch in ([("web", stolen)], [("web", honest)] * 9 + [("web", stolen)]):
                with pytest.raises(CaError) as refused:
                    await client.batch_sign_csrs(batch)
                assert refused.value.code == "PERMISSION_DENIED"
            assert (signer.batches_in_workers, signer.batches_inline) == (2, 2)
            assert rejected(server, "csr-spiffe-id-mismatch") == 2
            issued = server.metrics.value("trellis_ca_x509_svid_issued_total", kind="workload")
            assert issued == 21
            await client.close()

    run(scenario())


def test_bundle_watch_survives_agent_svid_renewals(ca_dir: Path, entries_file: Path) -> None:
    """Renewal swaps the client's channel; a watch on a retired channel resumes on the
    current one and keeps delivering changes."""

    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            stream = client.watch_bundle()
            await stream.__anext__()
            await client.renew()
            await client.renew()  # the channel the stream was opened on is now closed
            resumed = await stream.__anext__()  # full state again, on the new channel
            assert resumed.same_content(server.bundles.current)
            store = CaStore(ca_dir)
            extra = generate_private_key(KeyAlgorithm.P256)
            store.save_bundle(store.load_bundle().with_jwt_authority("k2", extra.public_key()))  # type: ignore[arg-type]
            changed = await stream.__anext__()
            assert "k2" in changed.jwt_authorities
            await stream.aclose()
            await client.close()

    run(scenario())


def test_client_without_an_identity_says_to_attest_first() -> None:
    async def scenario() -> None:
        client = CaClient("127.0.0.1:1", trust_roots=b"")
        with pytest.raises(CaError) as refused:
            await client.fetch_entries()
        assert refused.value.code == "UNAUTHENTICATED"
        assert "attest" in refused.value.detail

    run(scenario())


def test_a_re_signed_intermediate_is_picked_up_without_a_restart(
    ca_dir: Path, entries_file: Path
) -> None:
    from ca import JwtAuthority

    from .conftest import CLUSTER, PASSPHRASE

    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")  # agent SVID from the old intermediate
            old = server.intermediate.certificate
            store = CaStore(ca_dir)
            root = store.load_root(PASSPHRASE)
            fresh = root.issue_intermediate(
                CLUSTER, now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(days=7)
            )
            store.save_intermediate(fresh, JwtAuthority.generate())
            await eventually(lambda: server.intermediate.certificate != old)
            svid = (await client.batch_new_x509_svids([("web", key())]))[0]
            assert svid.chain[1] == fresh.certificate
            assert server._creds.svid.chain[1] == fresh.certificate
            assert server.metrics.value(
                "trellis_ca_authority_expiry_timestamp_seconds", authority="intermediate"
            ) == int(fresh.expires_at.timestamp())
            jwt = await client.new_jwt_svid("web", ["a"])
            await eventually(lambda: len(server.bundles.current.jwt_authorities) == 2)
            bundle = server.bundles.current
            validate_jwt_svid(
                jwt.token, "a", lambda td: bundle.jwt_authorities, now=dt.datetime.now(dt.UTC)
            )
            await client.close()

    run(scenario())


def test_an_expired_agent_svid_cannot_call(ca_dir: Path, entries_file: Path) -> None:
    """An expired client certificate already fails the TLS handshake (grpc verifies the
    chain and its validity); the agent sees UNAVAILABLE and must re-attest."""
    from ca import X509Svid

    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            agent_key = generate_private_key(KeyAlgorithm.P256)
            past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
            old = server.intermediate.issue_x509_svid(
                "spiffe://example.org/trellis/agent/node-a",
                agent_key.public_key(),
                now=past,
                ttl=dt.timedelta(minutes=30),
            )
            stale = client_for(server, agent_svid=X509Svid(old.spiffe_id, old.chain, agent_key))
            stale.timeout = 3
            with pytest.raises(CaError) as refused:
                await stale.fetch_entries()
            assert refused.value.code in ("UNAVAILABLE", "UNAUTHENTICATED")
            assert server.metrics.value("trellis_ca_x509_svid_issued_total", kind="workload") == 0
            await stale.close()

    run(scenario())
