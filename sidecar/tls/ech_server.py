"""The server's side of Encrypted ClientHello (RFC 9849 §7.1, shared mode): trial
decryption with the current and previous keys, rebuilding ClientHelloInner from its
encoding and the outer hello (§5.1), and the second ClientHello after a HelloRetryRequest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .alerts import AlertDescription, TLSError
from .codec import Buffer
from .ech import (
    EXT_ECH_OUTER_EXTENSIONS,
    EXT_ENCRYPTED_CLIENT_HELLO,
    INNER_EXTENSION,
    SUPPORTED_SUITES,
    ECHKey,
    OuterECH,
    decode_failure,
    illegal,
    pull_ech,
    push_outer_ech,
)
from .extensions import RawExtension, pull_extensions
from .hpke import Context, HpkeError, setup_base_r
from .messages import (
    ClientHello,
    push_client_hello,
)


def _pull_encoded_inner(data: bytes) -> tuple[ClientHello, bytes]:
    """EncodedClientHelloInner: the ClientHello body, then the padding."""
    buf = Buffer(data)
    legacy_version = buf.pull_uint16()
    random = buf.pull_bytes(32)
    session_id = buf.pull_vector(1, maximum=32)
    suites_raw = buf.pull_vector(2, minimum=2)
    if len(suites_raw) % 2:
        raise decode_failure("odd cipher_suites length")
    suites = tuple(
        int.from_bytes(suites_raw[i : i + 2], "big") for i in range(0, len(suites_raw), 2)
    )
    compression = buf.pull_vector(1, minimum=1)
    extensions = pull_extensions(buf)
    padding = buf.pull_rest()
    hello = ClientHello(random, session_id, suites, compression, extensions, legacy_version)
    return hello, padding


def decode_inner(encoded: bytes, outer: ClientHello) -> ClientHello:
    """ClientHelloInner from EncodedClientHelloInner and the outer hello (§5.1), with
    the checks §7.1 makes illegal_parameter: non-zero padding, a session id of its own,
    ech_outer_extensions referring to encrypted_client_hello, to a missing extension or
    out of order, and no inner-type encrypted_client_hello."""
    hello, padding = _pull_encoded_inner(encoded)
    if padding.strip(b"\x00"):
        raise illegal("non-zero padding in EncodedClientHelloInner")
    if hello.legacy_session_id:
        raise illegal("EncodedClientHelloInner with a legacy_session_id")
    outer_ext = list(outer.extensions)
    cursor = 0
    extensions: list[RawExtension] = []
    seen_outer_extensions = False
    for ext_type, data in hello.extensions:
        if ext_type != EXT_ECH_OUTER_EXTENSIONS:
            extensions.append((ext_type, data))
            continue
        if seen_outer_extensions:
            raise illegal("two ech_outer_extensions")
        seen_outer_extensions = True
        buf = Buffer(data)
        raw_types = buf.pull_vector(1, minimum=2, maximum=254)
        buf.expect_end()
        if len(raw_types) % 2:
            raise decode_failure("odd OuterExtensions length")
        for i in range(0, len(raw_types), 2):
            wanted = int.from_bytes(raw_types[i : i + 2], "big")
            if wanted == EXT_ENCRYPTED_CLIENT_HELLO:
                raise illegal("ech_outer_extensions refers to encrypted_client_hello")
            # §5.1: referenced in order; searching forward from the last one found.
            while cursor < len(outer_ext) and outer_ext[cursor][0] != wanted:
                cursor += 1
            if cursor == len(outer_ext):
                raise illegal(f"ech_outer_extensions refers to missing extension {wanted}")
            extensions.append(outer_ext[cursor])
            cursor += 1
    types = [t for t, _ in extensions]
    if len(set(types)) != len(types):
        raise illegal("duplicate extension in ClientHelloInner")
    if INNER_EXTENSION not in extensions:
        raise illegal("ClientHelloInner without an inner encrypted_client_hello")
    versions = next((d for t, d in extensions if t == 43), None)
    if versions is not None:
        offered = [int.from_bytes(versions[i : i + 2], "big") for i in range(1, len(versions), 2)]
        if any(v < 0x0304 for v in offered):
            # §7.1: ClientHelloInner offers TLS 1.3 and later only.
            raise illegal("ClientHelloInner offers a version before TLS 1.3")
    return replace(hello, legacy_session_id=outer.legacy_session_id, extensions=tuple(extensions))


@dataclass(slots=True)
class ServerECH:
    """An accepted offer: the context (for the second ClientHello) and what it used."""

    context: Context
    config_id: int
    kdf_id: int
    aead_id: int


def _aad(outer: ClientHello, ech: OuterECH) -> bytes:
    zeroed = push_outer_ech(replace(ech, payload=bytes(len(ech.payload))))
    extensions = tuple(
        (t, zeroed if t == EXT_ENCRYPTED_CLIENT_HELLO else d) for t, d in outer.extensions
    )
    return push_client_hello(replace(outer, extensions=extensions))[4:]


def open_client_hello(
    outer: ClientHello, ech: OuterECH, keys: Sequence[ECHKey]
) -> tuple[ClientHello, ServerECH] | None:
    """Trial decryption with every key whose config_id and suite match (§7.1): the
    ClientHelloInner and its context, or None (reject: go on with the outer hello)."""
    aad = _aad(outer, ech)
    for key in keys:
        config = key.config
        if config.config_id != ech.config_id:
            continue
        if (ech.kdf_id, ech.aead_id) not in config.cipher_suites:
            continue
        if (ech.kdf_id, ech.aead_id) not in SUPPORTED_SUITES:
            continue
        try:
            context = setup_base_r(ech.enc, key.private_key, config.info, ech.aead_id)
            encoded = context.open(aad, ech.payload)
        except HpkeError:
            continue
        inner = decode_inner(encoded, outer)
        return inner, ServerECH(context, ech.config_id, ech.kdf_id, ech.aead_id)
    return None


def open_second_client_hello(outer: ClientHello, ech: OuterECH, accepted: ServerECH) -> ClientHello:
    """§7.1.1: the second ClientHello of an accepted offer: same config and suite, an
    empty enc, sealed with the next sequence number; anything else is fatal."""
    if (ech.config_id, ech.kdf_id, ech.aead_id) != (
        accepted.config_id,
        accepted.kdf_id,
        accepted.aead_id,
    ) or ech.enc:
        raise illegal("second ClientHello changed its ECH config, suite or enc")
    try:
        encoded = accepted.context.open(_aad(outer, ech), ech.payload)
    except HpkeError as exc:
        raise TLSError(AlertDescription.decrypt_error, "second ClientHelloInner") from exc
    return decode_inner(encoded, outer)


@dataclass(frozen=True, slots=True)
class ServerOutcome:
    """What the server made of a ClientHello's ECH: `accepted` (the inner hello is
    used, with this context) or rejected (the outer one, retry_configs sent)."""

    accepted: ServerECH | None

    @property
    def label(self) -> str:
        return "accepted" if self.accepted is not None else "rejected"


def server_receive_ech(
    keys: Sequence[ECHKey], outer: ClientHello, previous: ServerOutcome | None, second: bool
) -> tuple[ClientHello, ServerOutcome | None]:
    """The ClientHello the handshake goes on with, and the ECH outcome (None: no ECH
    offered, or no keys to open one). `second`: this answers a HelloRetryRequest."""
    if not keys:
        return outer, None
    data = next((d for t, d in outer.extensions if t == EXT_ENCRYPTED_CLIENT_HELLO), None)
    if second:
        if previous is None or previous.accepted is None:
            return outer, previous
        if data is None:
            raise TLSError(AlertDescription.missing_extension, "second ClientHello dropped ECH")
        ech = pull_ech(data)
        if ech is None:
            raise illegal("second ClientHelloOuter of type inner")
        return open_second_client_hello(outer, ech, previous.accepted), previous
    if data is None:
        return outer, None
    ech = pull_ech(data)
    if ech is None:
        # Type inner on the wire: what a split-mode backend gets (§7.2); in shared mode
        # there is nothing to decrypt, so the hello is taken as it is.
        return outer, None
    opened = open_client_hello(outer, ech, keys)
    if opened is None:
        return outer, ServerOutcome(None)
    inner, state = opened
    return inner, ServerOutcome(state)
