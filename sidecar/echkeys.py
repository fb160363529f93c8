"""ECH keys as the agent hands them over (``sidecar.stek.EchKeyParts``) made into the
engine's ``ECHConfig`` / ``ECHKey`` (``sidecar.tls.ech``, RFC 9849 §4).

The CA sends only an X25519 key pair, a config id and a public name; every party that
needs the ECHConfig's bytes (the service's sidecars, its callers, ``trellis ech config``
for DNS) builds them here, the same way, so the config a caller seals to is byte for byte
the one the service's HPKE ``info`` is computed over (§6.1).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ca.spiffeid import SpiffeId
from sidecar.stek import EchKeyParts
from sidecar.tls.ech import ECHConfig, ECHKey, push_config_list
from sidecar.tls.hpke import AeadId, KdfId, KemId

__all__ = [
    "MAXIMUM_NAME_LENGTH",
    "ech_config",
    "ech_config_list",
    "ech_key",
    "https_record",
    "inner_server_name",
]

# §6.1.3: the inner server name is padded to this length so its length says nothing.
MAXIMUM_NAME_LENGTH = 64
# HKDF-SHA256 with every AEAD the engine's HPKE has, AES-128-GCM (the baseline) first.
SUITES = tuple((int(KdfId.HKDF_SHA256), int(aead)) for aead in AeadId)


def ech_config(parts: EchKeyParts) -> ECHConfig:
    return ECHConfig(
        config_id=parts.config_id,
        kem_id=KemId.DHKEM_X25519_HKDF_SHA256,
        public_key=parts.public_key,
        cipher_suites=SUITES,
        maximum_name_length=MAXIMUM_NAME_LENGTH,
        public_name=parts.public_name,
    )


def ech_key(parts: EchKeyParts) -> ECHKey:
    """The server's key: ValueError when the parts carry no private half."""
    return ECHKey(ech_config(parts), X25519PrivateKey.from_private_bytes(parts.private_key))


def ech_config_list(parts: Iterable[EchKeyParts]) -> bytes:
    """An ECHConfigList (§4) of these keys, in their order (current first)."""
    return push_config_list(ech_config(p) for p in parts)


def inner_server_name(spiffe_id: SpiffeId | None) -> str | None:
    """The name a caller puts in the inner (encrypted) ClientHello's SNI for the service
    `spiffe_id`: ``<sa>.<ns>.<trust domain>`` for the default ID shape, else None (no
    SNI). Only ever sent sealed: without ECH the mesh sends no SNI at all."""
    if spiffe_id is None:
        return None
    parts = spiffe_id.path.strip("/").split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        return None
    name = f"{parts[3]}.{parts[1]}.{spiffe_id.trust_domain.name}"
    # A DNS name (RFC 6066 §3: ASCII host_name), short enough to be padded (§6.1.3).
    ok = name.isascii() and all(label and len(label) <= 63 for label in name.split("."))
    return name if ok and len(name) <= MAXIMUM_NAME_LENGTH else None


def https_record(owner: str, config_list: bytes, ttl: int = 300, alpn: str = "h2") -> str:
    """The DNS HTTPS record (RFC 9460 §9, ServiceMode, TargetName "." = the owner itself)
    that publishes `config_list` in its `ech` SvcParam (RFC 9849 §4, base64 in the
    presentation format), in zone-file syntax."""
    name = owner if owner.endswith(".") else owner + "."
    value = base64.b64encode(config_list).decode("ascii")
    return f'{name} {ttl} IN HTTPS 1 . alpn="{alpn}" ech="{value}"'
