"""Permissive mode's pure parts: the TLS sniff and which ports a pod's policies open."""

from __future__ import annotations

import pytest

from core.labels import LabelSelector
from meshapi.policy import MtlsMode, Policy, PolicyDocument
from sidecar.permissive import looks_like_tls, plaintext_policy_for_pod

CLIENT_HELLO_HEAD = bytes.fromhex("16030100f8010000f40303")  # what OpenSSL 3.0 sends first


def test_a_client_hello_is_recognised_one_byte_at_a_time() -> None:
    for end in range(3):
        assert looks_like_tls(CLIENT_HELLO_HEAD[:end]) is None  # not enough to tell yet
    assert looks_like_tls(CLIENT_HELLO_HEAD[:3]) is True
    assert looks_like_tls(bytes.fromhex("160304")) is True  # RFC 8446 §5.1 versions


@pytest.mark.parametrize(
    "head",
    [b"GET / HTTP/1.1\r\n", b"PRI * HTTP/2.0", b"\x16\x02\x01", b"\x16\x03\x05", b"\x15\x03\x03"],
)
def test_anything_but_a_tls_handshake_record_is_plaintext(head: bytes) -> None:
    assert looks_like_tls(head) is False


def _policy(mtls: MtlsMode | None, *ports: int, app: str | None = None) -> Policy:
    selector = LabelSelector.parse({"matchLabels": {"app": app}} if app else {}, "s")
    return Policy(selector=selector, ports=ports, mtls=mtls)


def test_strict_wins_and_a_port_without_a_mode_is_strict() -> None:
    document = PolicyDocument(
        (
            _policy("PERMISSIVE"),  # the namespace onboarding
            _policy("STRICT", 5432),  # the database already moved in
            _policy(None, 8080),  # an allow list only: no opinion on the mode
            _policy("STRICT", app="other"),  # selects another pod
        )
    )
    modes = plaintext_policy_for_pod(document, {"app": "web"})
    assert modes.permissive
    assert modes.allows(8080) and modes.allows(9090)
    assert not modes.allows(5432)
    assert not plaintext_policy_for_pod(PolicyDocument((_policy(None),)), {}).permissive
    assert not plaintext_policy_for_pod(document, {"app": "other"}).allows(8080)
