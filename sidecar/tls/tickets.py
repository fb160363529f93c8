"""Stateless session tickets sealed under a rotating ring of STEKs (RFC 8446 §4.6.1).

A server never keeps resumption state: everything a resumption needs goes into the
ticket, sealed with AES-256-GCM under the ring's *active* session-ticket encryption key
(STEK). Every replica of a service holds the same ring, so a ticket issued by one
replica opens at another.

The ring, and the interface the key distributor uses
----------------------------------------------------
* `Stek(key_id, key, not_before, not_after)`: a 16-byte key id, a 32-byte AES-256 key
  and the Unix times (seconds, float) between which the key may *open* tickets. The key
  bytes never appear in `repr()`, `str()` or a log line.
* `StekRing.install(active, previous, next)`: one atomic swap of an immutable snapshot.
  `active` seals new tickets; `previous` (at most `MAX_PREVIOUS` = 24, an hour apart by
  default, so a day of tickets stays resumable) and `next` (distributed before it becomes
  active, so a replica that rotates first issues tickets the others already open) only
  open. A handshake reads the snapshot once, so a rotation never blocks or disturbs one
  in flight. Calling `install` with the same keys again is harmless; `rotations` counts
  only a change of the active key id.
* Keys live only in this object's memory; nothing here writes or logs them.
* `open()` looks the key up by id first (one dict lookup), so a ticket sealed under an
  unknown key costs no AEAD work.
* Metrics, counted here and read by the sidecar: `decrypt_failures[reason]` for
  `unknown_key`, `expired` (the key is in the ring but past `not_after`) and `corrupt`
  (authentication failed or the plaintext does not parse), `rotations`, `keys` (how many
  the ring holds) and `active_age(now)`. `on_decrypt_failure`, when set, is called with
  the reason as well (for a Prometheus counter).

Ticket wire format: `key_id (16) || nonce (12) || AES-256-GCM(plaintext, aad=key_id)`;
the plaintext is `TicketState` below, versioned by its first byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .alerts import TLSError
from .codec import Buffer, Writer
from .limits import MAX_CERTIFICATE_ENTRIES

__all__ = [
    "MAX_PREVIOUS",
    "MAX_TICKET",
    "Stek",
    "StekRing",
    "TicketState",
    "chain_sha256",
]

KEY_ID_LENGTH = 16
KEY_LENGTH = 32
NONCE_LENGTH = 12
TAG_LENGTH = 16
# 24 hourly keys back: a ticket sealed 23 hours ago still opens, one sealed 25 hours ago
# meets a key that has left the ring and gets a full handshake.
MAX_PREVIOUS = 24
# The peer's chain is in the ticket so a resumed peer can be re-verified against today's
# bundles and policy; an X509-SVID chain is two certificates of well under 2 KiB each.
MAX_CHAIN_BYTES = 16 * 1024
# A ticket larger than a sealed maximal state is not one of ours; refused before any work.
MAX_TICKET = KEY_ID_LENGTH + NONCE_LENGTH + TAG_LENGTH + MAX_CHAIN_BYTES + 4096
_MIN_TICKET = KEY_ID_LENGTH + NONCE_LENGTH + TAG_LENGTH + 1
_VERSION = 1


class DecryptFailure(StrEnum):
    unknown_key = "unknown_key"
    expired = "expired"
    corrupt = "corrupt"


@dataclass(frozen=True, slots=True)
class Stek:
    """One session-ticket encryption key. `key` is never shown by repr()."""

    key_id: bytes
    key: bytes = field(repr=False)
    not_before: float
    not_after: float

    def __post_init__(self) -> None:
        if len(self.key_id) != KEY_ID_LENGTH:
            raise ValueError(f"a STEK key id is {KEY_ID_LENGTH} bytes")
        if len(self.key) != KEY_LENGTH:
            raise ValueError(f"a STEK is {KEY_LENGTH} bytes (AES-256)")
        if self.not_after <= self.not_before:
            raise ValueError("a STEK's not_after must follow its not_before")

    def __str__(self) -> str:
        return f"Stek({self.key_id.hex()})"


@dataclass(frozen=True, slots=True)
class _Snapshot:
    active: Stek | None
    by_id: dict[bytes, tuple[Stek, AESGCM]]


class StekRing:
    """The active STEK, up to 24 previous ones and the next one (see the module doc)."""

    __slots__ = ("_snapshot", "decrypt_failures", "on_decrypt_failure", "rotations")

    def __init__(self) -> None:
        self._snapshot = _Snapshot(None, {})
        self.decrypt_failures: dict[str, int] = {reason.value: 0 for reason in DecryptFailure}
        self.rotations = 0
        self.on_decrypt_failure: Callable[[str], None] | None = None

    def __repr__(self) -> str:
        active = self._snapshot.active
        name = active.key_id.hex() if active is not None else None
        return f"StekRing(active={name}, keys={self.keys})"

    def install(self, active: Stek, previous: Sequence[Stek], next: Stek | None) -> None:
        """Replace the whole ring at once; handshakes in flight keep the old snapshot."""
        if len(previous) > MAX_PREVIOUS:
            raise ValueError(f"at most {MAX_PREVIOUS} previous STEKs")
        by_id: dict[bytes, tuple[Stek, AESGCM]] = {}
        for stek in (*previous, *((next,) if next is not None else ()), active):
            by_id[stek.key_id] = (stek, AESGCM(stek.key))
        old = self._snapshot.active
        if old is not None and old.key_id != active.key_id:
            self.rotations += 1
        self._snapshot = _Snapshot(active, by_id)  # one reference assignment: atomic

    @property
    def keys(self) -> int:
        return len(self._snapshot.by_id)

    def active_age(self, now: float) -> float | None:
        active = self._snapshot.active
        return None if active is None else max(0.0, now - active.not_before)

    def can_seal(self, now: float) -> bool:
        active = self._snapshot.active
        # not_before is not checked: a distributor whose clock runs a little ahead must not
        # stop every replica issuing tickets; not_after is what bounds a key's use.
        return active is not None and now < active.not_after

    def seal(self, plaintext: bytes, nonce: bytes) -> bytes:
        """A ticket under the active key; `nonce` is 12 fresh random bytes."""
        snapshot = self._snapshot
        active = snapshot.active
        if active is None:
            raise ValueError("the STEK ring holds no active key")
        _, aead = snapshot.by_id[active.key_id]
        return active.key_id + nonce + aead.encrypt(nonce, plaintext, active.key_id)

    def open(self, ticket: bytes, now: float) -> bytes | None:
        """The ticket's plaintext, or None (counted) when it is not a live ticket of ours."""
        if not _MIN_TICKET <= len(ticket) <= MAX_TICKET:
            self._failed(DecryptFailure.corrupt)
            return None
        key_id = ticket[:KEY_ID_LENGTH]
        entry = self._snapshot.by_id.get(key_id)
        if entry is None:
            self._failed(DecryptFailure.unknown_key)
            return None
        stek, aead = entry
        if now >= stek.not_after:
            self._failed(DecryptFailure.expired)
            return None
        nonce = ticket[KEY_ID_LENGTH : KEY_ID_LENGTH + NONCE_LENGTH]
        try:
            return aead.decrypt(nonce, ticket[KEY_ID_LENGTH + NONCE_LENGTH :], key_id)
        except InvalidTag:
            self._failed(DecryptFailure.corrupt)
            return None

    def count_corrupt(self) -> None:
        """A ticket that authenticated but whose plaintext did not parse."""
        self._failed(DecryptFailure.corrupt)

    def _failed(self, reason: DecryptFailure) -> None:
        self.decrypt_failures[reason.value] += 1
        if self.on_decrypt_failure is not None:
            self.on_decrypt_failure(reason.value)


def chain_sha256(chain: Sequence[bytes]) -> bytes:
    """SHA-256 over the chain's DER certificates, each length-prefixed."""
    digest = hashlib.sha256()
    for der in chain:
        digest.update(len(der).to_bytes(3, "big"))
        digest.update(der)
    return digest.digest()


@dataclass(frozen=True, slots=True)
class TicketState:
    """What a ticket carries: the PSK and what the original handshake established.

    Times are Unix milliseconds. `chain` is the peer's certificate chain (DER), kept so
    that a resumed peer is verified again against the current bundles and policy;
    `chain_hash` is its SHA-256 (`chain_sha256`). `replica_id` names the issuing replica:
    in strict mode only that replica accepts the ticket's early data.
    """

    psk: bytes = field(repr=False)
    cipher_suite: int
    alpn: str | None
    peer_spiffe_id: str | None
    chain_hash: bytes
    chain: tuple[bytes, ...]
    issued_ms: int
    lifetime: int
    age_add: int
    max_early_data: int
    replica_id: bytes

    def encode(self) -> bytes:
        w = Writer()
        w.push_uint8(_VERSION)
        w.push_vector(1, self.psk)
        w.push_uint16(self.cipher_suite)
        w.push_vector(1, (self.alpn or "").encode("ascii"))
        w.push_vector(2, (self.peer_spiffe_id or "").encode("utf-8"))
        w.push_bytes(self.chain_hash)
        with w.push_block(3):
            for der in self.chain:
                w.push_vector(3, der)
        w.push_bytes(self.issued_ms.to_bytes(8, "big"))
        w.push_uint32(self.lifetime)
        w.push_uint32(self.age_add)
        w.push_uint32(self.max_early_data)
        w.push_vector(1, self.replica_id)
        return w.data()

    @classmethod
    def decode(cls, data: bytes) -> TicketState | None:
        """The state, or None when the plaintext is not a state this version wrote."""
        try:
            buf = Buffer(data)
            if buf.pull_uint8() != _VERSION:
                return None
            psk = buf.pull_vector(1, minimum=32, maximum=48)
            suite = buf.pull_uint16()
            alpn = buf.pull_vector(1).decode("ascii") or None
            spiffe_id = buf.pull_vector(2).decode("utf-8") or None
            chain_hash = buf.pull_bytes(32)
            chain: list[bytes] = []
            with buf.pull_block(3) as length:
                if length > MAX_CHAIN_BYTES:
                    return None
                while not buf.eof():
                    chain.append(buf.pull_vector(3, minimum=1))
            if len(chain) > MAX_CERTIFICATE_ENTRIES or chain_sha256(chain) != chain_hash:
                return None
            issued_ms = int.from_bytes(buf.pull_bytes(8), "big")
            lifetime = buf.pull_uint32()
            age_add = buf.pull_uint32()
            max_early_data = buf.pull_uint32()
            replica_id = buf.pull_vector(1)
            buf.expect_end()
        except (TLSError, UnicodeDecodeError):
            return None
        return cls(
            psk,
            suite,
            alpn,
            spiffe_id,
            chain_hash,
            tuple(chain),
            issued_ms,
            lifetime,
            age_add,
            max_early_data,
            replica_id,
        )
