"""The probe's pre-handshake flood against a real sidecar's inbound port: endless
`user_canceled` warning alerts need no certificate, and two such connections once made
other callers' requests time out (the class of CVE-2016-8610). The sidecar must answer the
fifth with a fatal `unexpected_message` and close, while an allowed client's request on
another connection is served. Bounded in records and in every read's time."""

from __future__ import annotations

import select
import socket

from sidecar.tls import AlertDescription, AlertLevel
from sidecar.tls.limits import MAX_WARNING_ALERTS
from sidecar.tls.record import ContentType, plaintext_record

from .conftest import CLIENT, ECHO
from .harness import Pki, Procs, RawClient, start_echo, start_sidecar

ATTACK_RECORDS = 100_000
ANSWER_WAIT = 10.0
CONNECT = [(":method", "CONNECT"), (":authority", "echo:8080")]


def _flood(port: int, record: bytes, expected_at: int) -> tuple[int, bytes]:
    """Send `record` until the sidecar says anything; the count sent by then and all it
    sent until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = 0
        for sent in range(1, ATTACK_RECORDS + 1):
            try:
                sock.sendall(record)
            except OSError:
                break
            wait = ANSWER_WAIT if sent == expected_at else 0.0
            if select.select([sock], [], [], wait)[0]:
                break
        answer = bytearray()
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass
        return sent, bytes(answer)


def test_a_user_canceled_flood_on_the_inbound_port_is_cut_off_at_the_fifth_alert(
    procs: Procs, pki: Pki
) -> None:
    echo = start_echo(procs)
    b = start_sidecar(
        procs,
        "sidecar-b",
        {
            "svid_dir": str(pki.write(procs.workdir / "svid-b", ECHO)),
            "inbound": {"targets": {8080: {"app": f"127.0.0.1:{echo}"}}},
        },
    )
    alert = plaintext_record(
        ContentType.alert, bytes((AlertLevel.warning, AlertDescription.user_canceled))
    )
    floods = [_flood(b.inbound_port, alert, MAX_WARNING_ALERTS + 1) for _ in range(2)]
    fatal = plaintext_record(
        ContentType.alert, bytes((AlertLevel.fatal, AlertDescription.unexpected_message))
    )
    for sent, answer in floods:
        assert sent == MAX_WARNING_ALERTS + 1, f"answered after {sent} alerts"
        assert answer.startswith(fatal), answer[:16]
    good = RawClient(b.inbound_port, pki.write(procs.workdir / "svid-client", CLIENT))
    try:
        assert good.request(CONNECT) == 200
    finally:
        good.close()
    assert b.proc.alive()
