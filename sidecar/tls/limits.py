"""How much work a peer may make the engine do: before it authenticated, and without progress.

A TLS peer can make a receiver spend CPU without ever finishing a handshake or sending a
byte of application data. The classic case is CVE-2016-8610 ("SSL Death Alert"): OpenSSL
looped over warning alerts during the handshake for as long as the peer sent them. The
same class covers empty records, KeyUpdates with nothing in between, handshake messages
cut into one-byte records and oversized declared lengths. Each is bounded here:

* every handshake message is at most `MAX_HANDSHAKE_MESSAGE` bytes (rustls stops at 64 KiB
  too, Go for all but Certificate; an X509-SVID chain is a few KiB);
* until the handshake completes the peer may send at most `PRE_AUTH_BYTES` bytes of
  records, headers included, so one-byte records exhaust it six times faster than whole
  ones and the number of records processed before authentication is bounded as well;
* a Certificate carries at most `MAX_CERTIFICATE_ENTRIES` certificates, checked before
  any is parsed: path validation tries each candidate issuer's signature, before the
  peer has proved it holds any key;
* `Stall` counts the records in a row that brought no application data: warning alerts,
  zero-length application data records and KeyUpdates. The limits are BoringSSL's
  (kMaxWarningAlerts, kMaxEmptyRecords, kMaxKeyUpdates), which rustls shares, as OpenSSL
  does for alerts and empty records; one record past a limit is `unexpected_message`.

The engine stays sans-I/O: these are counts of what arrived, never clocks.
"""

from __future__ import annotations

from .alerts import AlertDescription, TLSError

# RFC 8446 §4 allows 2^24-1; nothing a Trellis peer sends comes close to 64 KiB (the
# largest is a Certificate with leaf and intermediate), and a ClientHello whose
# extensions fill their whole 2^16-1 vector is an attack, not a client.
MAX_HANDSHAKE_MESSAGE = 1 << 16
# Record bytes (headers included) a peer may send before the handshake completes. A
# ClientHello with a post-quantum share is about 1.5 KiB and a client flight a few KiB;
# 128 KiB leaves room for one maximal message in whole records and no more.
PRE_AUTH_BYTES = 1 << 17
# An X509-SVID chain is a leaf and one or two intermediates; ca.verify walks at most 5
# issuers and cryptography's builder 8. A 64 KiB Certificate holds 140 decoys named like
# an intermediate, each one a signature check per level of the walk: tens of milliseconds
# before the peer has proved anything. Ten entries bound that to a few checks per level.
MAX_CERTIFICATE_ENTRIES = 10
# RFC 8446 §4.2.10: 0-RTT data a server lets a ticket carry. Early data arrives before the
# client's Finished, so it counts against PRE_AUTH_BYTES too; 64 KiB leaves the rest of
# that budget for the handshake itself.
MAX_EARLY_DATA = 1 << 16
# What a server skips of early data it rejected when it does not know the ticket's own
# limit (it could not open the ticket, or it sent a HelloRetryRequest): the most any
# ticket of ours allows.
EARLY_DATA_SKIP = MAX_EARLY_DATA
# RFC 8446 §6.1: user_canceled is followed by close_notify, so one is all a peer needs.
MAX_WARNING_ALERTS = 4
# RFC 8446 §5.1 allows zero-length application data (as traffic-analysis cover).
MAX_EMPTY_RECORDS = 32
# RFC 8446 §4.6.3: a KeyUpdate without data between is legal but only ever needed once.
MAX_KEY_UPDATES = 32


def check_certificate_entries(count: int) -> None:
    """Refuse a chain longer than MAX_CERTIFICATE_ENTRIES before anything in it is parsed."""
    if count > MAX_CERTIFICATE_ENTRIES:
        raise TLSError(
            AlertDescription.bad_certificate,
            f"{count} certificates in the chain, more than {MAX_CERTIFICATE_ENTRIES}",
        )


def _stalled(what: str, limit: int) -> TLSError:
    return TLSError(
        AlertDescription.unexpected_message, f"more than {limit} {what} without application data"
    )


class Stall:
    """Records in a row from the peer that brought no application data, by kind.

    `active` is true while any count is non-zero, so the traffic path can test one
    attribute per record and call `progress()` only when there is something to reset.
    """

    __slots__ = ("active", "empty_records", "key_updates", "warning_alerts")

    def __init__(self) -> None:
        self.active = False
        self.warning_alerts = 0
        self.empty_records = 0
        self.key_updates = 0

    def progress(self) -> None:
        """Application data arrived: the peer is doing real work again."""
        self.active = False
        self.warning_alerts = 0
        self.empty_records = 0
        self.key_updates = 0

    def warning_alert(self) -> None:
        self.active = True
        self.warning_alerts += 1
        if self.warning_alerts > MAX_WARNING_ALERTS:
            raise _stalled("warning alerts", MAX_WARNING_ALERTS)

    def empty_record(self) -> None:
        self.active = True
        self.empty_records += 1
        if self.empty_records > MAX_EMPTY_RECORDS:
            raise _stalled("empty records", MAX_EMPTY_RECORDS)

    def key_update(self) -> None:
        self.active = True
        self.key_updates += 1
        if self.key_updates > MAX_KEY_UPDATES:
            raise _stalled("KeyUpdates", MAX_KEY_UPDATES)
