"""TLS alerts (RFC 8446 §6) and the engine's single protocol-error type."""

from __future__ import annotations

from enum import IntEnum


class AlertLevel(IntEnum):
    warning = 1
    fatal = 2


class AlertDescription(IntEnum):
    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    record_overflow = 22
    handshake_failure = 40
    bad_certificate = 42
    unsupported_certificate = 43
    certificate_revoked = 44
    certificate_expired = 45
    certificate_unknown = 46
    illegal_parameter = 47
    unknown_ca = 48
    access_denied = 49
    decode_error = 50
    decrypt_error = 51
    protocol_version = 70
    insufficient_security = 71
    internal_error = 80
    inappropriate_fallback = 86
    user_canceled = 90
    missing_extension = 109
    unsupported_extension = 110
    unrecognized_name = 112
    bad_certificate_status_response = 113
    unknown_psk_identity = 115
    certificate_required = 116
    no_application_protocol = 120
    ech_required = 121  # RFC 9849 §11.2


class TLSError(Exception):
    """A protocol failure. `alert` is the alert that was (or will be) sent to the peer.

    When the engine raises this from `receive_data`, the fatal alert record is already
    queued in `data_to_send()`, so the I/O shell only has to flush and close.
    """

    def __init__(self, alert: AlertDescription, reason: str = "") -> None:
        super().__init__(f"{alert.name}: {reason}" if reason else alert.name)
        self.alert = alert
        self.reason = reason


class LocalProtocolError(Exception):
    """The local application used the engine wrongly (like h11's LocalProtocolError).

    Never caused by peer bytes: a misbehaving peer only ever produces `TLSError`.
    """
