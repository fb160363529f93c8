"""What a handshake state is, and the little of the connection it may touch.

A state (`client.py`, `server.py`, `peerauth.py`) holds only the values valid at its
point of the handshake and turns one message into the next state. It reaches the
connection only through `HandshakeContext`: queue a handshake message (which also
enters the transcript), the one dummy change_cipher_spec, install keys, log a secret,
emit an event. Records, buffers, alerts and the post-handshake machinery stay private to
`Connection`, so a state cannot skip a step of the record layer by calling into it.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Protocol

from .alerts import AlertDescription, TLSError

if TYPE_CHECKING:
    from .config import TLSConfig
    from .events import Event
    from .keyschedule import Transcript
    from .suites import SuiteParams

__all__ = ["HandshakeContext", "HandshakeState"]


class HandshakeContext(Protocol):
    """The connection as the handshake states see it."""

    @property
    def config(self) -> TLSConfig: ...

    @property
    def now(self) -> dt.datetime:
        """The time certificates are verified at (LocalProtocolError if none was given)."""
        ...

    def begin(self, client_random: bytes) -> None:
        """The first ClientHello arrived: change_cipher_spec may come from here on
        (RFC 8446 §5), and key log lines are keyed by `client_random`."""
        ...

    def send(self, transcript: Transcript, message: bytes) -> None:
        """Add a handshake message to `transcript` and queue it under the current keys."""
        ...

    def send_ccs(self) -> None:
        """Appendix D.4: the one dummy change_cipher_spec (when compatibility mode is on)."""
        ...

    def install_read_keys(self, params: SuiteParams, secret: bytes) -> None: ...

    def install_write_keys(self, params: SuiteParams, secret: bytes) -> None:
        """Flush what was queued under the old keys, then protect with `secret`'s keys."""
        ...

    def discard_write_keys(self) -> None:
        """Back to plaintext writes: a HelloRetryRequest answered 0-RTT, and the second
        ClientHello goes out unprotected (RFC 8446 §4.1.2)."""
        ...

    def skip_early_data(self, limit: int) -> None:
        """RFC 8446 §4.2.10: early data was offered and is rejected: skip the records
        that do not open under the next read key, up to `limit` bytes."""
        ...

    def log_secret(self, label: str, secret: bytes) -> None: ...

    def emit(self, event: Event) -> None: ...


class HandshakeState:
    """A state of the handshake; anything it does not expect is unexpected_message."""

    __slots__ = ()

    def handle(
        self, ctx: HandshakeContext, msg_type: int, body: bytes, raw: bytes
    ) -> HandshakeState:
        raise TLSError(
            AlertDescription.unexpected_message,
            f"{type(self).__name__} did not expect handshake message {msg_type}",
        )

    @property
    def accepts_ccs(self) -> bool:
        """RFC 8446 §5: a dummy change_cipher_spec may arrive once the handshake began
        and until the peer's Finished."""
        return True

    @property
    def accepts_early_data(self) -> bool:
        """Whether application data now is accepted 0-RTT data (a server between its
        flight and the client's EndOfEarlyData)."""
        return False

    def receive_early_data(self, length: int) -> None:
        raise TLSError(AlertDescription.unexpected_message, "application data before handshake")
