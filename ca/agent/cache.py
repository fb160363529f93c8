"""The agent's SVID cache and rotation schedule (sans-I/O: ``now`` and the RNG are passed in).

Theory of operation. The cache holds the registration entries for this node, one
X509-SVID (with its key) per entry, the trust bundle, and a ``version`` that increases on
every change a Workload API stream must see (new SVID, rotation, entry added/removed,
bundle update). The shell (``rotator.py``) asks ``due(now)`` which entries need an SVID,
gets them signed, ``store()``s the results, and sleeps until ``next_wakeup(now)``.

Rotation happens at half the SVID's lifetime, moved by up to ±``jitter`` of the lifetime
at random: SVIDs issued together in a rolling restart spread out instead of
coming back to the CA as one herd at every half-life. When the CA is unreachable nothing
is removed early: an SVID stays served until ``expire(now)`` drops it at its notAfter.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.api import JwtSvidToken
from ca.bundle import TrustBundle
from ca.entries import RegistrationEntry
from ca.keys import PrivateKey
from ca.spiffeid import TrustDomain

__all__ = ["DEFAULT_JITTER", "CachedSvid", "JwtCache", "SvidCache", "rotation_time"]

DEFAULT_JITTER = 0.1
# Never schedule a rotation closer than this to issuance (guards absurdly short TTLs).
MIN_ROTATION_DELAY = dt.timedelta(milliseconds=200)


def rotation_time(
    issued_at: dt.datetime, expires_at: dt.datetime, rng: random.Random, jitter: float
) -> dt.datetime:
    """Half-life, ± up to ``jitter`` * lifetime."""
    lifetime = expires_at - issued_at
    offset = lifetime * (0.5 + rng.uniform(-jitter, jitter))
    return issued_at + max(offset, MIN_ROTATION_DELAY)


def _issuance_key(entry: RegistrationEntry) -> tuple[object, ...]:
    """What an issued X509-SVID depends on: when this changes, the SVID is re-issued."""
    return (entry.spiffe_id, entry.x509_svid_ttl, entry.dns_names)


@dataclass(frozen=True, slots=True)
class CachedSvid:
    entry: RegistrationEntry
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey
    issued_at: dt.datetime
    rotate_at: dt.datetime
    # Serialised once at store time: the Workload API hot path only copies bytes.
    chain_der: bytes
    key_der: bytes
    # The entry's issuance parameters when this SVID was signed (see ``_issuance_key``).
    issued_for: tuple[object, ...] = ()

    @property
    def expires_at(self) -> dt.datetime:
        return self.chain[0].not_valid_after_utc

    @classmethod
    def build(
        cls,
        entry: RegistrationEntry,
        chain: Sequence[x509.Certificate],
        private_key: PrivateKey,
        *,
        now: dt.datetime,
        rotate_at: dt.datetime,
    ) -> CachedSvid:
        return cls(
            entry,
            tuple(chain),
            private_key,
            now,
            rotate_at,
            b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain),
            private_key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            _issuance_key(entry),
        )


class SvidCache:
    def __init__(self, rng: random.Random | None = None, jitter: float = DEFAULT_JITTER) -> None:
        if not 0 <= jitter < 0.5:
            raise ValueError("jitter must be in [0, 0.5)")
        self._rng = rng or random.Random()  # noqa: S311 (scheduling jitter, not a secret)
        self._jitter = jitter
        self.entries: dict[str, RegistrationEntry] = {}
        self.svids: dict[str, CachedSvid] = {}
        self.bundle: TrustBundle | None = None
        self.federated: dict[TrustDomain, TrustBundle] = {}
        self.entries_revision: str | None = None
        self.version = 0

    def _changed(self) -> None:
        self.version += 1

    # -- inputs ------------------------------------------------------------------------

    def set_entries(
        self, entries: Iterable[RegistrationEntry], revision: str | None = None
    ) -> bool:
        new = {e.entry_id: e for e in entries}
        self.entries_revision = revision
        if new == self.entries:
            return False
        for entry_id in list(self.svids):
            kept = new.get(entry_id)
            if kept is None:
                del self.svids[entry_id]  # entry deleted: stop serving its identity now
            elif kept != self.svids[entry_id].entry:
                # Selectors or hint may change without re-issuing; keep the SVID but let
                # the new entry govern who may fetch it. If the SVID itself depends on what
                # changed, ``due`` schedules a re-issue.
                self.svids[entry_id] = dataclasses.replace(self.svids[entry_id], entry=kept)
        self.entries = new
        self._changed()
        return True

    def set_bundle(self, bundle: TrustBundle) -> bool:
        if self.bundle is not None and self.bundle.same_content(bundle):
            return False
        self.bundle = bundle
        self._changed()
        return True

    def set_federated(self, bundles: Iterable[TrustBundle]) -> bool:
        new = {b.trust_domain: b for b in bundles}
        if set(new) == set(self.federated) and all(
            new[td].same_content(self.federated[td]) for td in new
        ):
            return False
        self.federated = new
        self._changed()
        return True

    def store(
        self,
        entry_id: str,
        chain: Sequence[x509.Certificate],
        private_key: PrivateKey,
        *,
        now: dt.datetime,
    ) -> CachedSvid | None:
        """Cache a freshly signed SVID; ``None`` if its entry vanished meanwhile."""
        entry = self.entries.get(entry_id)
        if entry is None:
            return None
        expires = chain[0].not_valid_after_utc
        cached = CachedSvid.build(
            entry,
            chain,
            private_key,
            now=now,
            rotate_at=rotation_time(now, expires, self._rng, self._jitter),
        )
        self.svids[entry_id] = cached
        self._changed()
        return cached

    # -- queries -----------------------------------------------------------------------

    def due(self, now: dt.datetime) -> list[RegistrationEntry]:
        """Entries that need an SVID now: none yet, stale issuance parameters, or rotation due."""
        wanted = []
        for entry_id, entry in self.entries.items():
            cached = self.svids.get(entry_id)
            if (
                cached is None
                or cached.rotate_at <= now
                or cached.issued_for != _issuance_key(entry)
            ):
                wanted.append(entry)
        return sorted(wanted, key=lambda e: e.entry_id)

    def expire(self, now: dt.datetime) -> int:
        """Drop SVIDs past notAfter; an expired SVID is never served."""
        gone = [k for k, v in self.svids.items() if v.expires_at <= now]
        for key in gone:
            del self.svids[key]
        if gone:
            self._changed()
        return len(gone)

    def next_rotation(self) -> dt.datetime | None:
        return min((s.rotate_at for s in self.svids.values()), default=None)

    def nearest_expiry(self) -> dt.datetime | None:
        return min((s.expires_at for s in self.svids.values()), default=None)

    def next_wakeup(self, now: dt.datetime) -> dt.datetime | None:
        """When the shell should look again: the next rotation or expiry, whichever is first."""
        times = [t for t in (self.next_rotation(), self.nearest_expiry()) if t is not None]
        if self.due(now):
            return now
        return min(times, default=None)

    def svids_for(self, entries: Iterable[RegistrationEntry]) -> list[CachedSvid]:
        found = []
        for entry in entries:
            cached = self.svids.get(entry.entry_id)
            if cached is not None:
                found.append(cached)
        return found

    def trust_bundles(self) -> dict[TrustDomain, TrustBundle]:
        bundles = dict(self.federated)
        if self.bundle is not None:
            bundles[self.bundle.trust_domain] = self.bundle
        return bundles


class JwtCache:
    """JWT-SVIDs per (entry, audiences), reused until half their lifetime has passed."""

    def __init__(self, max_size: int = 4096) -> None:
        self._tokens: OrderedDict[tuple[str, tuple[str, ...]], tuple[JwtSvidToken, dt.datetime]] = (
            OrderedDict()
        )
        self._max = max_size

    @staticmethod
    def _key(entry_id: str, audience: Sequence[str]) -> tuple[str, tuple[str, ...]]:
        return entry_id, tuple(sorted(set(audience)))

    def get(self, entry_id: str, audience: Sequence[str], now: dt.datetime) -> JwtSvidToken | None:
        key = self._key(entry_id, audience)
        found = self._tokens.get(key)
        if found is None:
            return None
        token, issued = found
        if now >= issued + (token.expires_at - issued) / 2:
            del self._tokens[key]
            return None
        self._tokens.move_to_end(key)
        return token

    def put(
        self, entry_id: str, audience: Sequence[str], token: JwtSvidToken, now: dt.datetime
    ) -> None:
        key = self._key(entry_id, audience)
        self._tokens[key] = (token, now)
        self._tokens.move_to_end(key)
        while len(self._tokens) > self._max:
            self._tokens.popitem(last=False)

    def forget_entries(self, keep: Iterable[str]) -> None:
        kept = set(keep)
        for key in [k for k in self._tokens if k[0] not in kept]:
            del self._tokens[key]

    def __len__(self) -> int:
        return len(self._tokens)
