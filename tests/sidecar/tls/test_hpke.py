"""HPKE base mode (RFC 9180) against the RFC's Appendix A vectors and cryptography's HPKE."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hpke as reference
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sidecar.tls import hpke

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "rfc9180_a1_1.json").read_text()
)


def _h(name: str) -> bytes:
    return bytes.fromhex(VECTORS[name])


def test_derive_key_pair_gives_the_rfc_9180_a_1_1_keys() -> None:
    ephemeral = hpke.derive_key_pair(_h("ikmE"))
    recipient = hpke.derive_key_pair(_h("ikmR"))
    assert ephemeral.private_bytes_raw() == _h("skEm")
    assert ephemeral.public_key().public_bytes_raw() == _h("pkEm")
    assert recipient.private_bytes_raw() == _h("skRm")
    assert recipient.public_key().public_bytes_raw() == _h("pkRm")


def test_sender_context_has_the_rfc_9180_a_1_1_key_schedule() -> None:
    ephemeral = X25519PrivateKey.from_private_bytes(_h("skEm"))
    enc, ctx = hpke.setup_base_s(_h("pkRm"), _h("info"), 1, os.urandom, ephemeral=ephemeral)
    assert enc == _h("enc")
    assert ctx.key == _h("key")
    assert ctx.base_nonce == _h("base_nonce")
    assert ctx.exporter_secret == _h("exporter_secret")


def test_sequence_numbered_seals_match_the_rfc_9180_a_1_1_encryptions() -> None:
    ephemeral = X25519PrivateKey.from_private_bytes(_h("skEm"))
    _, sender = hpke.setup_base_s(_h("pkRm"), _h("info"), 1, os.urandom, ephemeral=ephemeral)
    receiver = hpke.setup_base_r(
        _h("enc"), X25519PrivateKey.from_private_bytes(_h("skRm")), _h("info"), 1
    )
    for vector in VECTORS["encryptions"]:
        aad, pt, ct = (bytes.fromhex(vector[k]) for k in ("aad", "pt", "ct"))
        # The vectors skip from 2 to 255: the contexts are moved on as the RFC's were.
        sender.seq = receiver.seq = vector["seq"]
        assert sender.seal(aad, pt) == ct
        assert receiver.open(aad, ct) == pt
        assert receiver.seq == vector["seq"] + 1


def test_export_matches_the_rfc_9180_a_1_1_exported_values() -> None:
    receiver = hpke.setup_base_r(
        _h("enc"), X25519PrivateKey.from_private_bytes(_h("skRm")), _h("info"), 1
    )
    for vector in VECTORS["exports"]:
        value = receiver.export(bytes.fromhex(vector["context"]), vector["length"])
        assert value == bytes.fromhex(vector["value"])


def test_open_with_altered_aad_fails_and_keeps_the_sequence_number() -> None:
    recipient = X25519PrivateKey.generate()
    pk = recipient.public_key().public_bytes_raw()
    enc, sender = hpke.setup_base_s(pk, b"info", 1, os.urandom)
    ct = sender.seal(b"outer hello", b"inner hello")
    receiver = hpke.setup_base_r(enc, recipient, b"info", 1)
    with pytest.raises(hpke.HpkeError):
        receiver.open(b"outer hellO", ct)
    assert receiver.seq == 0
    assert receiver.open(b"outer hello", ct) == b"inner hello"


def test_a_small_order_enc_is_an_hpke_error_not_a_crash() -> None:
    with pytest.raises(hpke.HpkeError):
        hpke.setup_base_r(bytes(32), X25519PrivateKey.generate(), b"", 1)
    with pytest.raises(hpke.HpkeError):
        hpke.setup_base_r(b"short", X25519PrivateKey.generate(), b"", 1)
    with pytest.raises(hpke.HpkeError):
        hpke.setup_base_r(os.urandom(32), X25519PrivateKey.generate(), b"", 0x7777)


_REFERENCE_AEADS = {
    hpke.AeadId.AES_128_GCM: reference.AEAD.AES_128_GCM,
    hpke.AeadId.AES_256_GCM: reference.AEAD.AES_256_GCM,
    hpke.AeadId.CHACHA20_POLY1305: reference.AEAD.CHACHA20_POLY1305,
}


@pytest.mark.parametrize("aead_id", list(_REFERENCE_AEADS), ids=lambda a: a.name)
def test_single_shot_messages_interoperate_with_cryptography_hpke(aead_id: hpke.AeadId) -> None:
    """cryptography's HPKE is single-shot (enc || ct, no AAD): messages go both ways."""
    suite = reference.Suite(
        reference.KEM.X25519, reference.KDF.HKDF_SHA256, _REFERENCE_AEADS[aead_id]
    )
    recipient = X25519PrivateKey.generate()
    info = b"tls ech\x00config"
    sealed = suite.encrypt(b"from cryptography", recipient.public_key(), info)
    ours = hpke.setup_base_r(sealed[:32], recipient, info, aead_id)
    assert ours.open(b"", sealed[32:]) == b"from cryptography"
    enc, sender = hpke.setup_base_s(
        recipient.public_key().public_bytes_raw(), info, aead_id, os.urandom
    )
    assert suite.decrypt(enc + sender.seal(b"", b"from trellis"), recipient, info) == (
        b"from trellis"
    )


def test_both_sides_derive_the_rfc_9180_a_2_1_chacha20_key_schedule() -> None:
    """The ChaCha20-Poly1305 suite (aead_id 3) is where a KDF/AEAD id mix-up shows:
    AES-128-GCM and HKDF-SHA256 are both 0x0001."""
    vector = json.loads((Path(__file__).parent / "data" / "rfc9180_a2_1.json").read_text())

    def h(name: str) -> bytes:
        return bytes.fromhex(vector[name])

    ephemeral = hpke.derive_key_pair(h("ikmE"))
    recipient = hpke.derive_key_pair(h("ikmR"))
    assert ephemeral.private_bytes_raw() == h("skEm")
    assert recipient.private_bytes_raw() == h("skRm")
    enc, sender = hpke.setup_base_s(h("pkRm"), h("info"), 3, os.urandom, ephemeral=ephemeral)
    receiver = hpke.setup_base_r(enc, recipient, h("info"), 3)
    assert enc == h("enc")
    for ctx in (sender, receiver):
        assert (ctx.key, ctx.base_nonce, ctx.exporter_secret) == (
            h("key"),
            h("base_nonce"),
            h("exporter_secret"),
        )
