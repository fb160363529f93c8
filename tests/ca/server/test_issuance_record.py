"""The CA server's issuance record (``issued.json``, ``ca.rotation``): how long SVIDs of
each intermediate stay valid, final once the server has stopped signing with one.

A real `CaServer` on loopback with a real agent client (``ca.api.CaClient``) over mTLS;
the intermediate is rotated by writing the CA directory, as the CLI does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from ca import KeyAlgorithm, generate_private_key
from ca.rotation import LEDGER_GRANULARITY, fingerprint, load_ledger
from ca.store import CaStore

from .conftest import CLUSTER, PASSPHRASE, attested, eventually, run, server_config, serving


def key() -> object:
    return generate_private_key(KeyAlgorithm.P256)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_record_keeps_each_intermediates_last_svid_expiry_and_closes_it_after_a_switch(
    ca_dir: Path, entries_file: Path, workers: int
) -> None:
    store = CaStore(ca_dir)
    path = store.issued_path(CLUSTER)
    config = dataclasses.replace(server_config(ca_dir, entries_file), sign_workers=workers)

    async def scenario() -> None:
        async with serving(config) as server:
            old = server.intermediate.certificate
            old_fp = fingerprint(old.public_bytes(Encoding.DER))
            client = await attested(server, "node-a")
            assert client.agent_svid is not None
            svids = await client.batch_new_x509_svids([("web", key())])
            latest = max(client.agent_svid.expires_at, svids[0].expires_at).timestamp()

            def recorded() -> bool:
                record = load_ledger(path).get(old_fp)
                return record is not None and record.signing and record.valid_until >= latest

            await eventually(recorded)

            root = store.load_root(PASSPHRASE)
            fresh = root.issue_intermediate(CLUSTER, now=dt.datetime.now(dt.UTC))
            store.replace_intermediate(fresh)
            fresh_fp = fingerprint(fresh.certificate.public_bytes(Encoding.DER))

            def closed() -> bool:
                records = load_ledger(path)
                return (
                    old_fp in records
                    and not records[old_fp].signing
                    and fresh_fp in records
                    and records[fresh_fp].signing
                )

            await eventually(closed, timeout=20)
            record = load_ledger(path)[old_fp]
            # Rounded up, never down: the record may say later than the truth, not earlier.
            assert latest <= record.valid_until < latest + LEDGER_GRANULARITY
            renewed = await client.batch_new_x509_svids([("web", key())])
            assert renewed[0].chain[1] == fresh.certificate
            await eventually(
                lambda: load_ledger(path)[fresh_fp].valid_until >= renewed[0].expires_at.timestamp()
            )
            assert load_ledger(path)[old_fp] == record  # closed: nothing more signed with it
            await client.close()

    run(scenario())


def test_an_unwritable_record_is_reported_once_and_the_server_keeps_signing(
    ca_dir: Path, entries_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A directory where the file should be: every write fails, as on a read-only Secret
    # volume (chmod cannot show it: the tests may run as root).
    path = CaStore(ca_dir).issued_path(CLUSTER)
    path.mkdir()
    caplog.set_level(logging.INFO, logger="trellis")

    async def scenario() -> None:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            for _ in range(3):
                await client.batch_new_x509_svids([("web", key())])
            polls = 0

            def polled_often() -> bool:
                nonlocal polls
                polls += 1
                return polls > 200  # eventually() checks every 20 ms; the poll is 50 ms

            await eventually(polled_often, timeout=10)
            await client.close()

    run(scenario())
    about_the_record = [
        r
        for r in caplog.records
        if str(path) in str(getattr(r, "fields", ""))
        and r.getMessage() != "issuance-record-unreadable"  # once, at start-up
    ]
    assert len(about_the_record) == 1, [r.getMessage() for r in about_the_record]
    assert about_the_record[0].levelno == logging.WARNING
