"""The connection core shared by client and server: records in, events out.

`Connection` owns the record layer, the inbound handshake reassembly buffer, the
outbound flight buffer and the event queue. The handshake itself lives in state
objects (`client.py`, `server.py`, `peerauth.py`), one type per state; each `handle()`
consumes one message and returns the next state, reaching the connection only through
the `HandshakeContext` (`state.py`) that `_Context` implements here. After the handshake
the state is `Traffic`, which can only be built from the proof values in `proofs.py`;
post-handshake messages (KeyUpdate, NewSessionTicket) are the connection's own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .alerts import AlertDescription, AlertLevel, LocalProtocolError, TLSError
from .config import TLSConfig
from .events import (
    AlertReceived,
    ApplicationData,
    ConnectionClosed,
    Event,
    HandshakeComplete,
    KeyUpdated,
    SessionTicket,
)
from .keylog import keylog_line
from .keyschedule import TrafficKeys, Transcript, next_traffic_secret, resumption_psk, traffic_keys
from .limits import MAX_HANDSHAKE_MESSAGE, Stall
from .messages import (
    HandshakeType,
    KeyUpdate,
    KeyUpdateRequest,
    pull_key_update,
    pull_new_session_ticket,
    push_key_update,
)
from .proofs import FinishedVerified, PeerAuthenticated
from .record import MAX_PLAINTEXT, ContentType, RecordProtection, RecordReader, plaintext_record
from .resumption import certificate_der
from .state import HandshakeContext, HandshakeState
from .suites import SuiteParams

__all__ = [
    "Connection",
    "DirectionSecrets",
    "HandshakeContext",
    "HandshakeState",
    "Now",
    "Traffic",
    "TrafficSecrets",
]

Now = dt.datetime | float | int | None


def to_datetime(now: Now) -> dt.datetime | None:
    if now is None or isinstance(now, dt.datetime):
        return now
    return dt.datetime.fromtimestamp(now, dt.UTC)


@dataclass(frozen=True, slots=True)
class DirectionSecrets:
    """One direction's record protection state, as kTLS wants it."""

    secret: bytes
    key: bytes
    iv: bytes
    seq: int


@dataclass(frozen=True, slots=True)
class TrafficSecrets:
    cipher_suite: int
    read: DirectionSecrets
    write: DirectionSecrets


class Traffic(HandshakeState):
    """The handshake is over; only post-handshake messages remain."""

    __slots__ = (
        "info",
        "params",
        "peer",
        "read_secret",
        "resumption_master_secret",
        "write_secret",
    )

    def __init__(
        self,
        finished: FinishedVerified,
        authenticated: PeerAuthenticated,
        params: SuiteParams,
        read_secret: bytes,
        write_secret: bytes,
        resumption_master_secret: bytes,
        info: HandshakeComplete,
    ) -> None:
        if not isinstance(finished, FinishedVerified) or not isinstance(
            authenticated, PeerAuthenticated
        ):
            raise TypeError("Traffic requires proof values")
        self.params = params
        self.read_secret = read_secret
        self.write_secret = write_secret
        self.resumption_master_secret = resumption_master_secret
        self.peer = authenticated.peer
        self.info = info

    @property
    def accepts_ccs(self) -> bool:
        return False

    def session_ticket(self, body: bytes) -> SessionTicket:
        """A NewSessionTicket (RFC 8446 §4.6.1) with the PSK it stands for."""
        ticket = pull_new_session_ticket(body)
        early = 0
        for ext_type, data in ticket.extensions:
            if ext_type == 42:  # early_data: uint32 max_early_data_size (RFC 8446 §4.2.10)
                if len(data) != 4:
                    raise TLSError(AlertDescription.decode_error, "bad early_data in ticket")
                early = int.from_bytes(data, "big")
        return SessionTicket(
            ticket=ticket.ticket,
            lifetime=ticket.ticket_lifetime,
            age_add=ticket.ticket_age_add,
            nonce=ticket.ticket_nonce,
            psk=resumption_psk(self.params, self.resumption_master_secret, ticket.ticket_nonce),
            cipher_suite=self.params.suite,
            max_early_data_size=early,
            server_name=self.info.server_name,
            alpn_protocol=self.info.alpn_protocol,
            peer_spiffe_id=self.info.peer_spiffe_id,
            peer_chain=self.peer_chain_der(),
        )

    def peer_chain_der(self) -> tuple[bytes, ...]:
        if self.peer is None:
            return ()
        return tuple(certificate_der(cert) for cert in self.peer.chain)


class _Context:
    """`HandshakeContext` over a `Connection`: the handful of its operations the
    handshake states need, and nothing else."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @property
    def config(self) -> TLSConfig:
        return self._conn._config

    @property
    def now(self) -> dt.datetime:
        return self._conn.now

    def begin(self, client_random: bytes) -> None:
        self._conn._handshake_started = True
        self._conn.client_random = client_random

    def send(self, transcript: Transcript, message: bytes) -> None:
        transcript.update(message)
        self._conn._hs_out += message

    def send_ccs(self) -> None:
        self._conn._send_ccs()

    def install_read_keys(self, params: SuiteParams, secret: bytes) -> None:
        self._conn._set_read_keys(params, traffic_keys(params, secret))

    def install_write_keys(self, params: SuiteParams, secret: bytes) -> None:
        self._conn._set_write_keys(params, traffic_keys(params, secret))

    def discard_write_keys(self) -> None:
        self._conn._flush_handshake()
        self._conn._write = None

    def skip_early_data(self, limit: int) -> None:
        self._conn._reader.skip_early = limit

    def log_secret(self, label: str, secret: bytes) -> None:
        self._conn._log_secret(label, secret)

    def emit(self, event: Event) -> None:
        self._conn._events.append(event)


class Connection:
    """Common sans-I/O machinery; use `ClientConnection` or `ServerConnection`."""

    is_client = False

    def __init__(self, config: TLSConfig, now: Now = None) -> None:
        self._config = config
        self._now = to_datetime(now)
        self._reader = RecordReader()
        self._write: RecordProtection | None = None
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._hs_in = bytearray()
        self._hs_out = bytearray()
        self._state: HandshakeState = HandshakeState()
        self._failed: TLSError | None = None
        self._read_closed = False
        self._write_closed = False
        self._ccs_received = False
        self._ccs_sent = False
        self._handshake_started = False
        self._stall = Stall()
        self.client_random = b""
        self._key_update_limit = config.key_update_after_records

    # --- public API --------------------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        return isinstance(self._state, Traffic)

    @property
    def read_closed(self) -> bool:
        """No more events will come: close_notify, a fatal alert, EOF or our failure."""
        return self._read_closed or self._failed is not None

    @property
    def write_closed(self) -> bool:
        """We sent close_notify or a fatal alert; nothing more may be sent."""
        return self._write_closed

    @property
    def negotiated(self) -> HandshakeComplete | None:
        return self._state.info if isinstance(self._state, Traffic) else None

    @property
    def can_send_application_data(self) -> bool:
        """Whether `send_application_data` may be called now: once the handshake is
        complete, and on a server also in the 0.5-RTT window that allows it (server.py)."""
        if self._write_closed or self._failed is not None:
            return False
        return isinstance(self._state, Traffic) or self._half_rtt_params() is not None

    def _half_rtt_params(self) -> SuiteParams | None:
        """The suite to seal 0.5-RTT data with (RFC 8446 §2.3) if the handshake is at a
        point where it may be sent, else None. Only a server ever sends it."""
        return None

    def receive_data(self, data: bytes, now: Now = None) -> None:
        """Feed bytes from the peer (b"" for EOF). Raises TLSError on protocol failure,
        after queueing the fatal alert in data_to_send()."""
        if now is not None:
            self._now = to_datetime(now)
        if self._failed is not None or self._read_closed:
            return  # RFC 8446 §6.1: data after a closure alert is ignored
        if not data:
            self._read_closed = True
            self._emit(ConnectionClosed(clean=False))
            return
        try:
            reader = self._reader
            reader.feed(data)
            events = self._events
            while not self._read_closed and self._failed is None:
                record = reader.next_record()
                if record is None:
                    break
                content_type, fragment, encrypted = record
                if (
                    content_type == ContentType.application_data
                    and encrypted
                    and fragment
                    and not self._hs_in
                    and isinstance(self._state, Traffic)
                ):
                    # The traffic phase's one common case, without the dispatch below.
                    events.append(ApplicationData(fragment))
                    if self._stall.active:
                        self._stall.progress()
                    continue
                self._handle_record(content_type, fragment, encrypted)
            reader.compact()
            if self._hs_out:
                self._flush_handshake()
        except TLSError as exc:
            self._fail(exc)
            raise
        except LocalProtocolError:
            raise  # the caller's mistake (e.g. no `now` to verify with), not the peer's
        except Exception as exc:
            # Last line of defence: a peer's bytes must never surface as a traceback.
            error = TLSError(AlertDescription.internal_error, f"{type(exc).__name__}: {exc}")
            self._fail(error)
            raise error from exc

    def events(self) -> Iterator[Event]:
        while self._events:
            yield self._events.popleft()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def take_events(self) -> list[Event]:
        """Every pending event at once (what `events()` yields, without a generator)."""
        taken = list(self._events)
        self._events.clear()
        return taken

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send_application_data(self, data: bytes) -> None:
        self.send_application_parts((data,))

    def send_application_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """`send_application_data` for the concatenation of `parts` (e.g. HTTP/2 frame
        headers and payload views), without joining them first: each record's plaintext
        is assembled from the pieces it covers in the one join sealing needs anyway."""
        state = self._state
        if isinstance(state, Traffic):
            params = state.params
        else:
            half_rtt = self._half_rtt_params()
            if half_rtt is None:
                raise LocalProtocolError("handshake not complete")
            params = half_rtt
        if self._write_closed or self._failed is not None:
            raise LocalProtocolError("connection closed for writing")
        seal = self._seal_application
        pieces: list[bytes | memoryview] = []
        room = MAX_PLAINTEXT
        for part in parts:
            if len(part) > room:
                view = memoryview(part)
                while len(view) > room:
                    pieces.append(view[:room])
                    view = view[room:]
                    seal(state, params, pieces, MAX_PLAINTEXT)
                    pieces = []
                    room = MAX_PLAINTEXT
                part = view
            if part:
                pieces.append(part)
                room -= len(part)
                if not room:
                    seal(state, params, pieces, MAX_PLAINTEXT)
                    pieces = []
                    room = MAX_PLAINTEXT
        if pieces:
            seal(state, params, pieces, MAX_PLAINTEXT - room)

    def _seal_application(
        self,
        state: HandshakeState,
        params: SuiteParams,
        pieces: list[bytes | memoryview],
        length: int,
    ) -> None:
        write = self._write
        assert write is not None
        if not isinstance(state, Traffic):
            # 0.5-RTT: KeyUpdate is a post-handshake message (RFC 8446 §4.6.3), so
            # there is no rekeying yet; only the AEAD's own limit (§5.5) binds here, and
            # the configured rekey point applies from the first record after the handshake.
            if write.seq >= params.record_limit:
                raise LocalProtocolError("0.5-RTT data over the cipher's record limit")
        elif write.seq >= (self._key_update_limit or params.record_limit):
            # RFC 8446 §5.5: rekey before the AEAD's safety limit.
            self._update_write_key(state, request_peer=False)
            write = self._write
            assert write is not None
        self._out += write.seal_pieces(
            ContentType.application_data, pieces, length, self._padding(length)
        )

    def update_key(self, request_peer_update: bool = True) -> None:
        """Send a KeyUpdate (RFC 8446 §4.6.3) and switch to the next write secret."""
        if not isinstance(self._state, Traffic):
            raise LocalProtocolError("handshake not complete")
        if self._write_closed or self._failed is not None:
            raise LocalProtocolError("connection closed for writing")
        self._update_write_key(self._state, request_peer=request_peer_update)

    def close(self) -> None:
        """Send close_notify and close our write side (RFC 8446 §6.1)."""
        if self._write_closed or self._failed is not None:
            return
        self._flush_handshake()
        self._send_alert(AlertLevel.warning, AlertDescription.close_notify)
        self._write_closed = True

    def traffic_secrets(self) -> TrafficSecrets:
        state = self._state
        if not isinstance(state, Traffic):
            raise LocalProtocolError("handshake not complete")
        read = self._reader.protection
        write = self._write
        assert read is not None and write is not None
        return TrafficSecrets(
            state.params.suite,
            DirectionSecrets(read.secret, read.key, read.iv, read.seq),
            DirectionSecrets(write.secret, write.key, write.iv, write.seq),
        )

    def record_bytes_awaited(self) -> int:
        """How many more bytes complete the record the engine holds in part (0 at a
        record boundary). Kernel TLS takes over the read side only at a boundary."""
        return self._reader.awaited()

    def receive_decrypted_record(self, content_type: int, fragment: bytes) -> None:
        """A record the kernel (kTLS) already decrypted after the handover: post-handshake
        messages (NewSessionTicket, KeyUpdate) and alerts reach the engine this way.
        Errors as for `receive_data`; anything queued in `data_to_send()` afterwards was
        sealed under the engine's stale write state and must not be sent."""
        if self._failed is not None or self._read_closed:
            return
        try:
            self._handle_record(content_type, fragment, True)
        except TLSError as exc:
            self._fail(exc)
            raise
        except Exception as exc:
            error = TLSError(AlertDescription.internal_error, f"{type(exc).__name__}: {exc}")
            self._fail(error)
            raise error from exc

    # --- what `_Context` offers the handshake states ------------------------------------

    @property
    def config(self) -> TLSConfig:
        return self._config

    @property
    def now(self) -> dt.datetime:
        if self._now is None:
            raise LocalProtocolError("certificate verification needs `now`")
        return self._now

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _flush_handshake(self) -> None:
        pending = self._hs_out
        if not pending:
            return
        for start in range(0, len(pending), MAX_PLAINTEXT):
            self._seal(ContentType.handshake, bytes(pending[start : start + MAX_PLAINTEXT]))
        pending.clear()

    def _send_initial_client_hello(self, message: bytes) -> None:
        # RFC 8446 §5.1: legacy_record_version 0x0301 on the initial ClientHello, and
        # records of at most 2^14 bytes (a large ticket can make it longer).
        for start in range(0, len(message), MAX_PLAINTEXT):
            fragment = message[start : start + MAX_PLAINTEXT]
            self._out.append(plaintext_record(ContentType.handshake, fragment, 0x0301))

    def _send_ccs(self) -> None:
        """Appendix D.4 middlebox compatibility: one dummy change_cipher_spec."""
        if self._ccs_sent or not self._config.middlebox_compatibility:
            return
        self._flush_handshake()
        self._out.append(plaintext_record(ContentType.change_cipher_spec, b"\x01"))
        self._ccs_sent = True

    def _seal(self, content_type: int, fragment: bytes | memoryview) -> None:
        write = self._write
        if write is None:
            self._out.append(plaintext_record(content_type, bytes(fragment)))
            return
        self._out += write.seal_parts(content_type, fragment, self._padding(len(fragment)))

    def _padding(self, length: int) -> int:
        block = self._config.record_padding
        if not block:
            return 0
        inner = length + 1
        return min(-inner % block, MAX_PLAINTEXT + 1 - inner)

    def _set_write_keys(self, params: SuiteParams, keys: TrafficKeys) -> None:
        self._flush_handshake()
        self._write = RecordProtection(params, keys)

    def _set_read_keys(self, params: SuiteParams, keys: TrafficKeys) -> None:
        if self._hs_in:
            # RFC 8446 §5.1: handshake messages MUST NOT span key changes.
            raise TLSError(AlertDescription.unexpected_message, "handshake data spans a key change")
        self._reader.protection = RecordProtection(params, keys)

    def _log_secret(self, label: str, secret: bytes) -> None:
        if self._config.key_log is not None:
            self._config.key_log(keylog_line(label, self.client_random, secret))

    def _send_alert(self, level: AlertLevel, description: AlertDescription) -> None:
        self._seal(ContentType.alert, bytes((level, description)))

    def _fail(self, error: TLSError) -> None:
        self._failed = error
        self._hs_out.clear()
        if not self._write_closed:
            # If sequence numbers are exhausted nothing more can be sent.
            with contextlib.suppress(TLSError):
                self._send_alert(AlertLevel.fatal, error.alert)
            self._write_closed = True

    def _update_write_key(self, state: Traffic, request_peer: bool) -> None:
        request = (
            KeyUpdateRequest.update_requested
            if request_peer
            else KeyUpdateRequest.update_not_requested
        )
        self._seal(ContentType.handshake, push_key_update(KeyUpdate(request)))
        state.write_secret = next_traffic_secret(state.params, state.write_secret)
        self._write = RecordProtection(state.params, traffic_keys(state.params, state.write_secret))
        self._emit(KeyUpdated("write", requested=False))

    def _peer_key_update(self, state: Traffic, message: KeyUpdate) -> None:
        self._stall.key_update()
        state.read_secret = next_traffic_secret(state.params, state.read_secret)
        self._set_read_keys(state.params, traffic_keys(state.params, state.read_secret))
        requested = message.request_update == KeyUpdateRequest.update_requested
        self._emit(KeyUpdated("read", requested=requested))
        if requested and not self._write_closed:
            # RFC 8446 §4.6.3: answer with update_not_requested under the old key.
            self._update_write_key(state, request_peer=False)

    def _post_handshake(self, state: Traffic, msg_type: int, body: bytes, raw: bytes) -> None:
        if msg_type == HandshakeType.key_update:
            self._peer_key_update(state, pull_key_update(body))
        elif msg_type == HandshakeType.new_session_ticket and self.is_client:
            ticket = state.session_ticket(body)
            self._store_ticket(ticket)
            self._emit(ticket)
        else:
            state.handle(_Context(self), msg_type, body, raw)  # unexpected_message

    # The (endpoint, expected SPIFFE ID) a client files its tickets under (client.py).
    _ticket_key: tuple[str, str] | None = None

    def _store_ticket(self, ticket: SessionTicket) -> None:
        store = self._config.ticket_store
        key = self._ticket_key
        if store is None or key is None or self._now is None:
            return
        expected = key[1]
        if expected and str(ticket.peer_spiffe_id) != expected:
            return  # a ticket only ever resumes with the identity the caller expects
        store.put(key, ticket, self._now.timestamp(), self._config.trust_generation)

    # --- inbound records ---------------------------------------------------------------

    def _handle_record(self, content_type: int, fragment: bytes, encrypted: bool) -> None:
        if self._hs_in and content_type != ContentType.handshake:
            # RFC 8446 §5.1: handshake messages MUST NOT be interleaved with other types.
            raise TLSError(AlertDescription.unexpected_message, "record interleaved with handshake")
        if content_type == ContentType.handshake:
            if not fragment:
                # RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent.
                raise TLSError(AlertDescription.unexpected_message, "empty handshake record")
            self._hs_in += fragment
            self._process_handshake()
        elif content_type == ContentType.application_data:
            if encrypted and self._state.accepts_early_data:
                # RFC 8446 §2.3: 0-RTT data, flagged so the caller can treat it as the
                # replayable data it is.
                self._state.receive_early_data(len(fragment))
                if fragment:
                    self._emit(ApplicationData(fragment, early=True))
                return
            if not encrypted or not isinstance(self._state, Traffic):
                raise TLSError(
                    AlertDescription.unexpected_message, "application data before handshake"
                )
            if fragment:
                self._emit(ApplicationData(fragment))
                self._stall.progress()
            else:
                self._stall.empty_record()
        elif content_type == ContentType.change_cipher_spec:
            # RFC 8446 §5: a single byte 0x01, only while the handshake is in progress.
            if (
                fragment != b"\x01"
                or not self._handshake_started
                or not self._state.accepts_ccs
                or self._ccs_received
            ):
                raise TLSError(AlertDescription.unexpected_message, "unexpected change_cipher_spec")
            self._ccs_received = True
        elif content_type == ContentType.alert:
            self._handle_alert(fragment)
        else:
            raise TLSError(AlertDescription.unexpected_message, f"record type {content_type}")

    def _handle_alert(self, fragment: bytes) -> None:
        if not fragment:
            # RFC 8446 §5.1: zero-length fragments of Alert type MUST NOT be sent.
            raise TLSError(AlertDescription.unexpected_message, "empty alert record")
        if len(fragment) != 2:
            raise TLSError(AlertDescription.decode_error, "alert is not two bytes")
        level, description = fragment[0], fragment[1]
        try:
            desc: AlertDescription | int = AlertDescription(description)
        except ValueError:
            desc = description
        try:
            lvl: AlertLevel | int = AlertLevel(level)
        except ValueError:
            lvl = level
        self._emit(AlertReceived(lvl, desc))
        if description == AlertDescription.close_notify:
            self._read_closed = True
            self._emit(ConnectionClosed(clean=True))
        elif description == AlertDescription.user_canceled:
            # RFC 8446 §6.1: close_notify should follow; a peer that sends user_canceled
            # over and over instead is spending our CPU (CVE-2016-8610).
            self._stall.warning_alert()
        else:
            # RFC 8446 §6.2: every other alert is fatal, whatever its level says.
            self._read_closed = True
            self._write_closed = True
            self._emit(ConnectionClosed(clean=False))

    def _process_handshake(self) -> None:
        buf = self._hs_in
        while len(buf) >= 4 and not self._read_closed:
            length = int.from_bytes(buf[1:4], "big")
            if length > MAX_HANDSHAKE_MESSAGE:
                raise TLSError(AlertDescription.decode_error, "handshake message too large")
            if len(buf) < 4 + length:
                return
            raw = bytes(buf[: 4 + length])
            del buf[: 4 + length]
            state = self._state
            if isinstance(state, Traffic):
                self._post_handshake(state, raw[0], raw[4:], raw)
                continue
            # A context per message, not an attribute: connection <-> context would be a
            # reference cycle, and every connection would wait for the cycle collector.
            ctx: HandshakeContext = _Context(self)
            self._state = state.handle(ctx, raw[0], raw[4:], raw)
            if self._reader.pre_auth_budget is not None and isinstance(self._state, Traffic):
                # The peer authenticated (its Finished verified): from here on its
                # records are bounded by what the application reads, not by a budget.
                self._reader.pre_auth_budget = None
