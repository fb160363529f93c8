"""Root and intermediate rotation: prepare, activate, retire; and the issuance record.

The model is SPIRE's (``localauthority x509 prepare|activate|taint|revoke``, 1.11+), over
the local CA directory (``ca.store``):

1. **prepare** makes the next root (its key encrypted with the root passphrase, like the
   current one) and publishes its certificate in the trust bundle beside the current root.
   Nothing signs with it yet. ``ca serve`` re-reads the bundle and streams it to agents,
   and agents to workloads over the Workload API: every verifier learns the new root
   before any chain ends in it.
2. **activate** (once the bundle has reached every workload: one bundle refresh) makes the
   prepared root the root and re-issues every cluster's intermediate under it. ``ca serve``
   picks the new intermediate up without a restart and signs every new SVID with it;
   agents renew at half-life, so within one SVID lifetime every workload holds a chain to
   the new root. Both roots are in the bundle meanwhile, so old and new chains verify.
3. **retire** removes the old root from the bundle, and is refused while anything it
   anchors may still be valid: an intermediate it signed that is still in use, or SVIDs
   signed by one it signed. (SPIRE's *taint* would make agents renew early; here agents
   renew at half-life anyway, so retiring waits one SVID lifetime instead.)

**Intermediate rotation** is step 2 alone for one cluster, under the same root: SVIDs of
the old intermediate keep verifying (same root) until they expire.

How long SVIDs of a replaced intermediate stay valid is only known to the CA server that
signed them, so ``ca serve`` keeps a record, ``DIR/clusters/NAME/issued.json``::

    {"intermediates": {"<SHA-256 of the intermediate's DER, hex>":
        {"serial": "<hex>", "valid_until": <unix seconds>, "signing": true|false}}}

``valid_until`` is the latest notAfter of any SVID signed with that intermediate (rounded
up to ``LEDGER_GRANULARITY`` so that a busy CA rewrites the file rarely); ``signing`` turns
false once the server has stopped signing with it, and only then is ``valid_until`` final.
Without a final record (another host's CA, an older server) retire falls back to the
intermediate's own notAfter, which bounds every SVID it signed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ca.keys import write_public_file

__all__ = [
    "LEDGER_GRANULARITY",
    "Blocker",
    "IssuanceLedger",
    "LedgerError",
    "LedgerRecord",
    "blocker_for_retire",
    "fingerprint",
    "issued_by",
    "load_ledger",
]

LEDGER_GRANULARITY = 5.0  # seconds
MAX_LEDGER_BYTES = 1024 * 1024


class LedgerError(ValueError):
    """The issuance record is unreadable."""


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    serial: str
    valid_until: float  # the latest notAfter of an SVID it signed (unix seconds, rounded up)
    signing: bool  # the CA server may still sign with it: valid_until may still grow


def fingerprint(certificate_der: bytes) -> str:
    return hashlib.sha256(certificate_der).hexdigest()


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key signed ``certificate`` (two roots share one subject name,
    so names alone cannot tell)."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load_ledger(path: Path) -> dict[str, LedgerRecord]:
    """The record ``ca serve`` keeps; a missing file is an empty record."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise LedgerError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) > MAX_LEDGER_BYTES:
        raise LedgerError(f"{path} is {len(raw)} bytes (limit {MAX_LEDGER_BYTES})")
    try:
        doc = json.loads(raw)
        items = doc["intermediates"].items()
        return {
            str(fp): LedgerRecord(
                str(entry["serial"]), float(entry["valid_until"]), bool(entry["signing"])
            )
            for fp, entry in items
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(f"{path} is not an issuance record: {exc!r}") from exc


def _dump(records: Mapping[str, LedgerRecord]) -> bytes:
    doc = {
        "intermediates": {
            fp: {"serial": r.serial, "valid_until": r.valid_until, "signing": r.signing}
            for fp, r in sorted(records.items())
        }
    }
    return json.dumps(doc, indent=2).encode() + b"\n"


class IssuanceLedger:
    """The CA server's side: note every SVID signed, write the record when it grew.

    ``issued`` is on the signing path: a hash and a comparison, no I/O; ``flush`` (the
    server's maintenance loop) writes the file, atomically, only when something changed.
    """

    def __init__(self, path: Path, records: Mapping[str, LedgerRecord]) -> None:
        self.path = path
        self.records = dict(records)
        self._dirty = False

    def signing_with(self, certificate: x509.Certificate) -> None:
        fp = fingerprint(_der(certificate))
        old = self.records.get(fp)
        if old is None or not old.signing:
            until = old.valid_until if old is not None else 0.0
            self.records[fp] = LedgerRecord(f"{certificate.serial_number:x}", until, True)
            self._dirty = True

    def stopped_signing_all_but(self, certificate: x509.Certificate) -> None:
        """At start-up: ``certificate`` signs from now on; every other one no longer."""
        keep = fingerprint(_der(certificate))
        for fp, record in list(self.records.items()):
            if fp != keep and record.signing:
                self.records[fp] = LedgerRecord(record.serial, record.valid_until, False)
                self._dirty = True
        self.signing_with(certificate)

    def stopped_signing(self, certificate: x509.Certificate) -> None:
        fp = fingerprint(_der(certificate))
        old = self.records.get(fp)
        if old is not None and old.signing:
            self.records[fp] = LedgerRecord(old.serial, old.valid_until, False)
            self._dirty = True

    def issued(self, issuer_der: bytes, not_after: float) -> None:
        fp = fingerprint(issuer_der)
        old = self.records.get(fp)
        if old is not None and not_after <= old.valid_until:
            return
        rounded = math.ceil(not_after / LEDGER_GRANULARITY) * LEDGER_GRANULARITY
        if old is None:
            # Signed by an intermediate never announced: keep it open (signing), so that
            # retire never takes this partial figure as final.
            serial = f"{x509.load_der_x509_certificate(issuer_der).serial_number:x}"
            self.records[fp] = LedgerRecord(serial, rounded, True)
        else:
            self.records[fp] = LedgerRecord(old.serial, rounded, old.signing)
        self._dirty = True

    def flush(self) -> bool:
        """Write the record if it changed; True if written. Raises OSError."""
        if not self._dirty:
            return False
        write_public_file(self.path, _dump(self.records))
        self._dirty = False
        return True


def _utc(timestamp: float | dt.datetime) -> str:
    when = (
        timestamp
        if isinstance(timestamp, dt.datetime)
        else dt.datetime.fromtimestamp(timestamp, dt.UTC)
    )
    return f"{when:%Y-%m-%d %H:%M:%S} UTC"


@dataclass(frozen=True, slots=True)
class Blocker:
    """Something a root anchors that is still valid: why it cannot be retired yet."""

    until: dt.datetime
    reason: str


def blocker_for_retire(
    root: x509.Certificate,
    clusters: Iterable[tuple[str, x509.Certificate, list[x509.Certificate], Path]],
    now: dt.datetime,
) -> list[Blocker]:
    """What ``root`` anchors that may still be valid at ``now``, latest first.

    ``clusters``: each cluster's name, current intermediate, replaced intermediates and the
    path of its issuance record.
    """
    blockers: list[Blocker] = []
    for name, current, superseded, ledger_path in clusters:
        if issued_by(current, root) and current.not_valid_after_utc > now:
            blockers.append(
                Blocker(
                    current.not_valid_after_utc,
                    f"cluster {name}'s intermediate (serial {current.serial_number:x}) is"
                    f" signed by it and valid until {_utc(current.not_valid_after_utc)};"
                    f" run trellis ca intermediate rotate --cluster {name}",
                )
            )
        records = load_ledger(ledger_path)
        for cert in superseded:
            if not issued_by(cert, root) or cert.not_valid_after_utc <= now:
                continue
            record = records.get(fingerprint(_der(cert)))
            serial = f"{cert.serial_number:x}"
            if record is not None and not record.signing:
                until = min(
                    cert.not_valid_after_utc,
                    dt.datetime.fromtimestamp(record.valid_until, dt.UTC),
                )
                why = "SVIDs it signed are valid until"
            elif record is not None:
                until = cert.not_valid_after_utc
                why = "the CA server still signs with it; it is valid until"
            else:
                until = cert.not_valid_after_utc
                why = "no CA server recorded what it signed; it is valid until"
            if until > now:
                blockers.append(
                    Blocker(
                        until,
                        f"cluster {name}'s previous intermediate (serial {serial}): {why}"
                        f" {_utc(until)}",
                    )
                )
    return sorted(blockers, key=lambda b: b.until, reverse=True)
