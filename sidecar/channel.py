"""The secure channel under HTTP/2: today the Trellis engine, tomorrow kTLS.

`SecureChannel` is the small interface a `Session` needs from whatever protects its
bytes: the first flight, inbound wire bytes → plaintext + state, plaintext → wire bytes,
and close; plus, once the handshake is done, the two certificate chains that
authenticated it (the session drains the connection when either stops being valid).
`EngineChannel` drives the sans-I/O engine. A kTLS channel (records done by
the kernel after the handshake) implements the same calls, so the pool and the HTTP/2
layer above stay as they are.

Resumption and 0-RTT: a client channel built with `early` bytes (the HTTP/2 preface and
the first stream's request, already judged replay-safe by the caller) hands them to the
engine, which sends them as 0-RTT data when it offers a ticket that allows it (RFC 8446
§2.3). Whatever happens, the bytes reach the peer exactly once in order: if the engine
sent nothing early, or the server rejected it (§4.2.10), the channel sends them as the
first 1-RTT data right behind the client Finished. On the server, bytes that arrived as
0-RTT come out in `ChannelInput.early`, apart from the rest, so the caller can treat
them as the replayable bytes they are; `ChannelInput.half_rtt` says the answers to them
may go out at once, before the client's Finished (the engine allows that only in a
resumption, whose ticket already authenticated the client).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509

from ca.spiffeid import SpiffeId
from sidecar.ktls import KtlsSocket
from sidecar.tls import (
    AlertReceived,
    ApplicationData,
    ClientConnection,
    Connection,
    ConnectionClosed,
    HandshakeComplete,
    PeerCertificate,
    ServerConnection,
    TLSConfig,
)
from sidecar.tls.alerts import AlertDescription

from .echkeys import inner_server_name

__all__ = ["ChannelInput", "EngineChannel", "KtlsChannel", "SecureChannel"]


@dataclass(slots=True)
class ChannelInput:
    """What one `receive()` produced."""

    plaintext: list[bytes]
    handshake: HandshakeComplete | None = None  # set on the call that completed it
    # Server: 0-RTT bytes (RFC 8446 §2.3), which precede the handshake's completion and
    # any `plaintext` of the same call.
    early: list[bytes] = field(default_factory=list)
    # Server: the handshake is not complete, but application data may already be
    # sealed (a resumption past our Finished: 0.5-RTT data, RFC 8446 §2.3).
    half_rtt: bool = False
    closed: bool = False  # the peer's direction ended (close_notify, alert or EOF)
    peer_alert: str | None = None


class SecureChannel(Protocol):
    @property
    def negotiated(self) -> HandshakeComplete | None: ...

    @property
    def peer_chain(self) -> tuple[x509.Certificate, ...]:
        """The chain the peer presented and the engine verified (empty until then)."""
        ...

    @property
    def local_chain(self) -> tuple[x509.Certificate, ...]:
        """The chain we presented on this connection."""
        ...

    @property
    def peer_id(self) -> SpiffeId | None:
        """The peer's SPIFFE ID once its chain verified: on a resumption, as soon as the
        ticket opened and its chain verified again, ahead of any 0-RTT data."""
        ...

    def initial(self) -> bytes: ...

    def receive(self, data: bytes, now: float | None) -> tuple[ChannelInput, bytes]:
        """Feed wire bytes (b"" for EOF); returns the input and wire bytes to send.
        `now` (for certificate validity) may be None once the handshake is complete.
        Raises `TLSError` (its alert is in `pending()`) on a protocol failure."""
        ...

    def seal_parts(self, parts: list[bytes | memoryview]) -> bytes:
        """Wire bytes carrying the concatenation of `parts` (HTTP/2 frame headers and
        payload views, which must not change until this returns)."""
        ...

    def close(self) -> bytes: ...

    def pending(self) -> bytes: ...


class EngineChannel:
    """The Trellis sans-I/O TLS 1.3 engine as a `SecureChannel`."""

    __slots__ = ("_done", "_early", "_local_chain", "_peer_chain", "_peer_id", "_tls")

    def __init__(
        self,
        config: TLSConfig,
        *,
        client: bool,
        now: float,
        endpoint: str | None = None,
        expected_peer: SpiffeId | None = None,
        early: bytes = b"",
    ) -> None:
        """`endpoint` and `expected_peer` (client) name the ticket-store slot to resume
        from and file new tickets under; `early` is what to send first (see the module
        docstring)."""
        self._tls: Connection = (
            ClientConnection(
                config,
                # RFC 9849: the service's name travels only sealed in the inner hello; the
                # outer names the public name. Without ECH the mesh sends no SNI at all.
                server_name=inner_server_name(expected_peer) if config.ech_configs else None,
                now=now,
                endpoint=endpoint,
                expected_peer=expected_peer,
                early_data=early,
                replay_safe=bool(early),
            )
            if client
            else ServerConnection(config, now=now)
        )
        self._early = early  # until the handshake says whether the server took it
        self._done = False
        self._local_chain = tuple(config.certificate_chain)
        self._peer_chain: tuple[x509.Certificate, ...] = ()
        self._peer_id: SpiffeId | None = None

    @property
    def negotiated(self) -> HandshakeComplete | None:
        return self._tls.negotiated

    @property
    def peer_chain(self) -> tuple[x509.Certificate, ...]:
        return self._peer_chain

    @property
    def local_chain(self) -> tuple[x509.Certificate, ...]:
        return self._local_chain

    @property
    def peer_id(self) -> SpiffeId | None:
        return self._peer_id

    def initial(self) -> bytes:
        return self._tls.data_to_send()

    def receive(self, data: bytes, now: float | None) -> tuple[ChannelInput, bytes]:
        tls = self._tls
        # `now` matters only for certificate validity, i.e. during the handshake.
        tls.receive_data(data, now=None if self._done else now)
        result = ChannelInput([])
        for event in tls.take_events():
            if type(event) is ApplicationData:
                (result.early if event.early else result.plaintext).append(event.data)
            elif isinstance(event, HandshakeComplete):
                self._done = True
                result.handshake = event
                early, self._early = self._early, b""
                if early and event.early_data != "accepted":
                    # Not sent early, or rejected (RFC 8446 §4.2.10: the server skipped
                    # it): the first 1-RTT bytes, right behind our Finished.
                    tls.send_application_data(early)
            elif isinstance(event, PeerCertificate):
                # Emitted only after the chain verified and CertificateVerify proved
                # the key: what the session may rely on until the chain's notAfter.
                self._peer_chain = event.chain
                self._peer_id = event.spiffe_id
            elif isinstance(event, ConnectionClosed):
                result.closed = True
            elif isinstance(event, AlertReceived) and event.description not in (
                AlertDescription.close_notify,
                AlertDescription.user_canceled,
            ):
                desc = event.description
                result.peer_alert = desc.name if isinstance(desc, AlertDescription) else str(desc)
        if not self._done:
            result.half_rtt = tls.can_send_application_data
        return result, tls.data_to_send()

    def seal_parts(self, parts: list[bytes | memoryview]) -> bytes:
        tls = self._tls
        if tls.write_closed:
            return b""
        tls.send_application_parts(parts)
        return tls.data_to_send()

    def close(self) -> bytes:
        self._tls.close()
        return self._tls.data_to_send()

    def pending(self) -> bytes:
        return self._tls.data_to_send()

    @property
    def engine(self) -> Connection:
        """The engine, for `sidecar.ktls.attach` (its traffic secrets and sequence numbers)."""
        return self._tls


class KtlsChannel:
    """A channel whose records the kernel seals and opens (`sidecar.ktls`), after the
    engine's handshake: `receive` takes plaintext the kernel opened (read with recvmsg by
    `Session`, control records already handed to the engine) and `seal_parts` returns
    plaintext for a plain `send()`, which the kernel frames and seals."""

    __slots__ = ("_closed", "_engine", "ktls")

    def __init__(self, engine: EngineChannel, ktls: KtlsSocket) -> None:
        self._engine = engine
        self.ktls = ktls
        self._closed = False

    @property
    def negotiated(self) -> HandshakeComplete | None:
        return self._engine.negotiated

    @property
    def peer_chain(self) -> tuple[x509.Certificate, ...]:
        return self._engine.peer_chain

    @property
    def local_chain(self) -> tuple[x509.Certificate, ...]:
        return self._engine.local_chain

    @property
    def peer_id(self) -> SpiffeId | None:
        return self._engine.peer_id

    def initial(self) -> bytes:
        return b""

    def receive(self, data: bytes, now: float | None) -> tuple[ChannelInput, bytes]:
        # b"": close_notify (or EOF) read by `KtlsSocket.recv`.
        return ChannelInput([data] if data else [], closed=not data), b""

    def seal_parts(self, parts: list[bytes | memoryview]) -> bytes:
        if self._closed or self.ktls.write_closed:
            return b""
        return b"".join(parts)

    def close(self) -> bytes:
        # close_notify goes as a control record through the kernel (sendmsg), not as
        # bytes for the transport: the caller sends it once its own writes are out.
        self._closed = True
        return b""

    def pending(self) -> bytes:
        return b""
