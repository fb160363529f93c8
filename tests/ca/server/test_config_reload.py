"""The CA server's reloadable files, broken while it serves: every broken edit is refused
with a log line naming the problem, the previous state stays in force and in use, and the
next good edit still takes effect (the reload loop outlived every broken one).

In-process server on 127.0.0.1, real files in a real CA directory, the server's own poll
loop (``poll_interval`` 0.05 s); agents are real ``CaClient``s over mutual TLS. The five
files: entries (``--entries``), federation (``--federation``), banned agents
(``--banned-agents``), the trust bundle (``bundle.json``) and the cluster intermediate.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from ca import JwtAuthority, KeyAlgorithm, RootAuthority, TrustDomain, generate_private_key
from ca.bundle import TrustBundle
from ca.keys import private_key_pem
from ca.store import CaStore

from .conftest import CLUSTER, PASSPHRASE, attested, eventually, run, server_config, serving

Breakage = tuple[str, Callable[[Path], None], str]  # (what, how, what the log must name)
DEEP = "[" * 50_000 + "]" * 50_000
_PEM = Encoding.PEM


def _replace_with_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _write(text: str | bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return write


def _restore(path: Path, good: bytes, round_: int) -> None:
    if path.is_dir():
        path.rmdir()
    path.write_bytes(good)
    _bump(path, round_)


def _bump(path: Path, round_: int) -> None:
    # Reloads compare (mtime, size, inode): make every edit's stamp distinct.
    stamp = time.time() + round_
    os.utime(path, (stamp, stamp))


def _refusals(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [
        str(getattr(r, "fields", {}).get("error"))
        for r in caplog.records
        if r.getMessage() == event
    ]


async def _each_refused(
    caplog: pytest.LogCaptureFixture,
    path: Path,
    event: str,
    breakages: Sequence[Breakage],
    still_in_force: Callable[[], Awaitable[None]],
) -> None:
    good = path.read_bytes()
    for round_, (what, breakage, named) in enumerate(breakages, 1):
        seen = len(_refusals(caplog, event))
        breakage(path)
        _bump(path, round_)
        try:
            await eventually(lambda n=seen: len(_refusals(caplog, event)) > n, timeout=5)
        except AssertionError:
            raise AssertionError(f"{what}: no {event} logged") from None
        error = _refusals(caplog, event)[-1]
        assert named in error, (what, error)
        await still_in_force()
        _restore(path, good, round_)


def _deeply_nested_is_not_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()


# -- entries --------------------------------------------------------------------------------

ENTRY_BREAKAGES: list[Breakage] = [
    ("not YAML", _write("entries: [unclosed\n"), "not valid YAML"),
    ("not a list", _write("entries: {web: 1}\n"), "'entries' must be a list"),
    ("a bad SPIFFE ID", _write("entries: [{spiffe_id: 7, selectors: [unix:uid:1]}]\n"), "spiffe"),
    (
        "another trust domain",
        _write(
            "entries:\n  - spiffe_id: spiffe://evil.org/ns/default/sa/web\n"
            "    selectors: [unix:uid:1000]\n    nodes: [node-a]\n"
        ),
        "evil.org",
    ),
    ("nested too deeply", _write(DEEP), "nested too deeply"),
    ("a directory", _replace_with_directory, "Is a directory"),
]


def test_broken_entries_edits_are_refused_and_the_last_good_entries_stay_served(
    ca_dir: Path, entries_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            revision = (await client.fetch_entries()).revision

            async def in_force() -> None:
                assert (await client.fetch_entries()).revision == revision

            with caplog.at_level(logging.ERROR, logger="trellis"):
                await _each_refused(
                    caplog, entries_file, "entries-reload-failed", ENTRY_BREAKAGES, in_force
                )
            assert server.metrics.value("trellis_ca_entries_reload_errors_total") == len(
                ENTRY_BREAKAGES
            )
            entries_file.write_text(entries_file.read_text().replace("node-b", "node-a"))
            _bump(entries_file, len(ENTRY_BREAKAGES) + 1)
            entries = server.entries
            await eventually(lambda: len(entries.current().for_node("node-a")) == 3)
            assert len(await client.fetch_entries()) == 3
            await client.close()

    run(scenario())
    _deeply_nested_is_not_a_traceback(caplog)


# -- federation -----------------------------------------------------------------------------


def _federation_doc(partner_pem: str, **item: object) -> str:
    base: dict[str, object] = {
        "trustDomain": "partner.org",
        "bundleEndpointURL": "https://127.0.0.1:9/",
        "bundleEndpointSPIFFEID": "spiffe://partner.org/trellis/ca/west",
        "bootstrapBundle": partner_pem,
    }
    base.update(item)
    return json.dumps({"trustDomains": [base]})


def test_broken_federation_edits_are_refused_and_the_relationships_kept(
    ca_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = dt.datetime.now(dt.UTC)
    partner = RootAuthority.create(TrustDomain("partner.org"), now=now)
    pem = TrustBundle(TrustDomain("partner.org"), (partner.certificate,)).to_pem().decode()
    path = tmp_path / "federation.yaml"
    path.write_text(_federation_doc(pem))
    breakages: list[Breakage] = [
        ("not YAML", _write("trustDomains: [unclosed\n"), "not YAML or JSON"),
        (
            "plain HTTP",
            _write(_federation_doc(pem, bundleEndpointURL="http://127.0.0.1:9/")),
            "bundleEndpointURL",
        ),
        ("the own trust domain", _write(_federation_doc(pem, trustDomain="example.org")), "own"),
        ("no bootstrap bundle", _write(_federation_doc(pem, bootstrapBundle=None)), "bootstrap"),
        ("not UTF-8", _write(b"trustDomains: [\xff]\n"), "UTF-8"),
        ("nested too deeply", _write(DEEP), "nested too deeply"),
        ("a directory", _replace_with_directory, "Is a directory"),
    ]

    async def scenario() -> None:
        config = replace(server_config(ca_dir), federation_path=path)
        async with serving(config) as server:
            before = server.federation.relationships
            assert [r.trust_domain.name for r in before] == ["partner.org"]

            async def in_force() -> None:
                assert server.federation.relationships == before

            with caplog.at_level(logging.ERROR, logger="trellis"):
                await _each_refused(caplog, path, "federation-reload-failed", breakages, in_force)
            path.write_text(json.dumps({"trustDomains": []}))
            _bump(path, len(breakages) + 1)
            await eventually(lambda: server.federation.relationships == ())

    run(scenario())
    _deeply_nested_is_not_a_traceback(caplog)


# -- banned agents --------------------------------------------------------------------------


def test_broken_ban_list_edits_are_refused_and_the_bans_stay_in_force(
    ca_dir: Path, entries_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bans = tmp_path / "banned-agents.yaml"
    bans.write_text("- node-a\n")
    breakages: list[Breakage] = [
        ("not YAML", _write("- [node-b\n"), "not YAML"),
        ("not a list", _write("banned: node-a\n"), "must be a YAML list"),
        ("not a node name", _write("- node-a\n- not a node\n"), "is not a node name"),
        ("not UTF-8", _write(b"- node-\xff\n"), "not UTF-8"),
        ("nested too deeply", _write(DEEP), "nested too deeply"),
        ("a directory", _replace_with_directory, "cannot read"),
    ]

    async def scenario() -> None:
        config = replace(server_config(ca_dir, entries_file), banned_agents_path=bans)
        async with serving(config) as server:
            other = await attested(server, "node-b")

            async def in_force() -> None:
                assert server.service.is_banned("node-a")
                await other.fetch_entries()

            with caplog.at_level(logging.ERROR, logger="trellis"):
                await _each_refused(
                    caplog, bans, "banned-agents-reload-failed", breakages, in_force
                )
            bans.write_text("[]\n")
            _bump(bans, len(breakages) + 1)
            await eventually(lambda: not server.service.is_banned("node-a"))
            await other.close()

    run(scenario())
    _deeply_nested_is_not_a_traceback(caplog)


# -- the trust bundle -----------------------------------------------------------------------


def test_broken_trust_bundle_edits_are_refused_and_agents_keep_being_served(
    ca_dir: Path, entries_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CaStore(ca_dir)
    bundle = store.load_bundle()
    impostor = RootAuthority.create(TrustDomain("example.org"), now=dt.datetime.now(dt.UTC))
    jwt_only = TrustBundle(bundle.trust_domain, (), dict(bundle.jwt_authorities))
    breakages: list[Breakage] = [
        ("not JSON", _write('{"keys": ['), "not JSON"),
        ("no keys array", _write("[]"), "'keys' array"),
        # Each of these would leave the CA unable to verify any agent SVID, its own
        # intermediate included: every agent refused at once.
        ("no root at all", _write(jwt_only.to_json()), "no root"),
        (
            "only an impostor root",
            _write(
                TrustBundle(
                    bundle.trust_domain, (impostor.certificate,), dict(bundle.jwt_authorities)
                ).to_json()
            ),
            "no root",
        ),
    ]

    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            served = server.bundles.current

            async def in_force() -> None:
                assert server.bundles.current is served
                await client.fetch_entries()
                fresh = await attested(server, "node-b")
                await fresh.close()

            with caplog.at_level(logging.ERROR, logger="trellis"):
                await _each_refused(
                    caplog, store.bundle_path, "bundle-reload-failed", breakages, in_force
                )
            extra = JwtAuthority.generate()
            store.save_bundle(bundle.with_jwt_authority(extra.key_id, extra.public_key))
            await eventually(lambda: extra.key_id in server.bundles.current.jwt_authorities)
            await client.fetch_entries()
            await client.close()

    run(scenario())


# -- the cluster intermediate ---------------------------------------------------------------


def test_a_half_written_or_impostor_intermediate_is_refused_and_the_old_one_keeps_signing(
    ca_dir: Path, entries_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CaStore(ca_dir)
    directory = store.cluster_dir(CLUSTER)
    now = dt.datetime.now(dt.UTC)
    fresh = store.load_root(PASSPHRASE).issue_intermediate(CLUSTER, now=now)
    impostor = RootAuthority.create(TrustDomain("example.org"), now=now).issue_intermediate(
        CLUSTER, now=now
    )
    good_key = (directory / "intermediate.key").read_bytes()

    def impostor_pair(path: Path) -> None:
        # Key first, then certificate: a whole, matching pair, from another root.
        (directory / "intermediate.key").write_bytes(private_key_pem(impostor.private_key))
        path.write_bytes(impostor.certificate.public_bytes(_PEM))

    breakages: list[Breakage] = [
        ("not PEM", _write("not a certificate\n"), "intermediate.crt"),
        # The certificate of a re-signed intermediate, its key not written yet.
        ("a certificate without its key", _write(fresh.certificate.public_bytes(_PEM)), "key"),
        ("another root's intermediate", impostor_pair, "root"),
    ]

    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            old = server.intermediate.certificate

            async def in_force() -> None:
                assert server.intermediate.certificate == old
                (svid,) = await client.batch_new_x509_svids(
                    [("web", generate_private_key(KeyAlgorithm.P256))]
                )
                assert svid.chain[1] == old
                (directory / "intermediate.key").write_bytes(good_key)

            with caplog.at_level(logging.ERROR, logger="trellis"):
                await _each_refused(
                    caplog,
                    directory / "intermediate.crt",
                    "intermediate-reload-failed",
                    breakages,
                    in_force,
                )
            # The whole re-signed pair, as `trellis ca intermediate` writes it, is taken.
            store.save_intermediate(fresh, JwtAuthority.generate())
            await eventually(lambda: server.intermediate.certificate == fresh.certificate)
            (svid,) = await client.batch_new_x509_svids(
                [("web", generate_private_key(KeyAlgorithm.P256))]
            )
            assert svid.chain[1] == fresh.certificate
            await client.close()

    run(scenario())
