"""Trellis's sans-I/O TLS 1.3 engine.

Theory of operation
-------------------
The engine is a pure function of its inputs, in the manner of h11, h2 and aioquic:
the caller feeds bytes from the peer with `receive_data(data, now=...)`, drains
`events()`, and writes whatever `data_to_send()` returns. There are no sockets,
clocks, threads or asyncio here, and no randomness except the `rng` callable the
caller puts in `TLSConfig` (OpenSSL does draw its own for ML-KEM encapsulation and
signature nonces inside `cryptography`). Time enters only as `now`, used for
certificate validity.

Layers, bottom up:

* `codec` — `Buffer.pull_*`/`Writer.push_*`; `pull_block` turns any overrun or
  trailing byte into `decode_error`.
* `messages`, `extensions` — one frozen dataclass per handshake message with a
  `pull_x`/`push_x` pair; extensions stay an ordered tuple of raw pairs so a parsed
  message re-serialises byte-identically, and typed views are parsed once at the edge.
* `record` — TLSPlaintext/TLSCiphertext framing, AEAD with per-key precomputed
  objects, padding, length limits, and the content-type rules of RFC 8446 §5.
* `keyschedule` — HKDF-Expand-Label and the three stages (`EarlySecret` →
  `HandshakeSecret` → `MasterSecret`), PSK-ready for resumption and 0-RTT.
* `groups`, `signatures`, `suites`, `verify` — the primitives from `cryptography`,
  wrapped so that every failure becomes the alert RFC 8446 names.
* `client`, `server`, `peerauth` — the handshake, one class per state. A state holds
  frozen values with only what is valid at that point and `handle()` returns the next
  state; a message the state does not expect is `unexpected_message` by construction.
  `peerauth` holds the peer's Certificate, CertificateVerify and Finished states once,
  for both sides. States reach the connection only through `state.HandshakeContext`
  (send a handshake message, install keys, log a secret, emit an event). The
  post-handshake `Traffic` state can only be built from `FinishedVerified` and
  `PeerAuthenticated`, which only the verifiers in `proofs` create.
* `connection` — the shared machinery: record dispatch, CCS tolerance, alerts,
  KeyUpdate, NewSessionTicket, close_notify, the event queue and `traffic_secrets()`
  for kTLS.
* `limits` — what a peer may make the engine do: 64 KiB per handshake message, ten
  certificates per chain, 128 KiB of records before the handshake completes, and a few
  warning alerts, empty records or KeyUpdates in a row without application data
  (CVE-2016-8610's class).
* `tickets`, `resumption`, `replay`, `ticketstore` — session resumption and 0-RTT
  (RFC 8446 §2.2, §2.3). A server with `TLSConfig.ticket_ring` (a `StekRing`, fed by
  the key distributor through `install(active, previous, next)`) sends stateless tickets
  sealed with AES-256-GCM and resumes them with `psk_dhe_ke` only, re-verifying the
  ticket's peer chain against today's bundles and policy. Early data is accepted only
  within the ticket-age window, once (`ReplayCache`) and, in strict mode, only by the
  issuing replica; rejected early data is skipped and the handshake goes on in 1-RTT. A
  client with `TLSConfig.ticket_store` keeps tickets per (endpoint, expected SPIFFE ID)
  and offers each once; it sends `early_data` only when the caller says it is
  `replay_safe`. Received 0-RTT arrives as `ApplicationData(early=True)` before
  `HandshakeComplete`, whose `early_data` is "accepted", "rejected" or "none" on both
  sides and `session_resumed` says whether a ticket was used.
* `hpke`, `ech` — Encrypted ClientHello (RFC 9849) on HPKE base mode (RFC 9180, composed
  on `cryptography`'s primitives). A client with `TLSConfig.ech_config_list` seals its
  real ClientHello (SNI, ALPN, ticket) under the first usable config and names only the
  config's public name in clear; a rejection authenticates the public name against
  `ech_public_name_roots` and raises `ECHRejected` (ech_required sent) carrying the
  server's `retry_configs` for one new connection. `ech_grease` sends a GREASE extension
  when no config is known. A server with `ech_keys` (current first, previous after)
  trial-decrypts, accepts, or rejects with retry_configs and `ech_public_credential`.
  `HandshakeComplete.ech` is "accepted", "rejected" (server), "grease" (client) or "none".

Errors: every protocol failure is a `TLSError` carrying its `AlertDescription`; when
`receive_data` raises it, the fatal alert is already queued in `data_to_send()` and
the connection is dead. A peer's bytes never raise anything else; `LocalProtocolError`
means the caller used the engine wrongly (sending before the handshake, no `now`).

Use::

    config = TLSConfig(rng=os.urandom, certificate_chain=(leaf, intermediate),
                       private_key=key, trust_bundles={"example.org": [root]},
                       alpn_protocols=("h2",), peer_policy=lambda spiffe_id: ...)
    conn = ClientConnection(config, server_name="svc", now=time.time())
    sock.sendall(conn.data_to_send())                   # the ClientHello
    while True:
        try:
            conn.receive_data(sock.recv(65536), now=time.time())
        except TLSError:
            sock.sendall(conn.data_to_send())          # the fatal alert
            raise
        for event in conn.events():
            ...                                        # HandshakeComplete, ApplicationData, ...
        sock.sendall(conn.data_to_send())

Post-handshake, `conn.traffic_secrets()` gives the suite and, per direction, the
traffic secret, key, IV and next sequence number (what kTLS's `TLS_TX`/`TLS_RX` take).
"""

from .alerts import AlertDescription, AlertLevel, LocalProtocolError, TLSError
from .client import ClientConnection
from .config import TLSConfig
from .connection import Connection, DirectionSecrets, TrafficSecrets
from .credentials import Credential
from .ech import ECHConfig, ECHConfigError, ECHKey, ECHRejected, generate_ech_key
from .events import (
    AlertReceived,
    ApplicationData,
    ConnectionClosed,
    Event,
    HandshakeComplete,
    KeyUpdated,
    PeerCertificate,
    SessionTicket,
)
from .groups import NamedGroup
from .keylog import file_key_log
from .replay import ReplayCache
from .server import ServerConnection
from .signatures import SignatureScheme
from .suites import CipherSuite
from .tickets import Stek, StekRing
from .ticketstore import TicketStore
from .verify import PeerVerifier, SpiffeVerifier, VerifiedPeer

__all__ = [
    "AlertDescription",
    "AlertLevel",
    "AlertReceived",
    "ApplicationData",
    "CipherSuite",
    "ClientConnection",
    "Connection",
    "ConnectionClosed",
    "Credential",
    "DirectionSecrets",
    "ECHConfig",
    "ECHConfigError",
    "ECHKey",
    "ECHRejected",
    "Event",
    "HandshakeComplete",
    "KeyUpdated",
    "LocalProtocolError",
    "NamedGroup",
    "PeerCertificate",
    "PeerVerifier",
    "ReplayCache",
    "ServerConnection",
    "SessionTicket",
    "SignatureScheme",
    "SpiffeVerifier",
    "Stek",
    "StekRing",
    "TLSConfig",
    "TLSError",
    "TicketStore",
    "TrafficSecrets",
    "VerifiedPeer",
    "file_key_log",
    "generate_ech_key",
]
