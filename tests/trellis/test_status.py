"""The status block is rendered from what the processes report, and says when they don't."""

from __future__ import annotations

from dataclasses import replace

from trellis.up.status import Samples, SidecarInfo, Snapshot, StatusView, render

VIEW = StatusView(
    trust_domain="example.org",
    run_dir="/tmp/trellis-up-x",
    metrics={
        "ca": "http://127.0.0.1:1/metrics",
        "agent": "http://127.0.0.1:2/metrics",
        "sidecar-load": "http://127.0.0.1:3/metrics",
        "sidecar-echo": "http://127.0.0.1:4/metrics",
        "load": "http://127.0.0.1:5/metrics",
    },
    sidecars=(
        SidecarInfo("load", "spiffe://example.org/ns/demo/sa/load", "http://127.0.0.1:3"),
        SidecarInfo("echo", "spiffe://example.org/ns/demo/sa/echo", "http://127.0.0.1:4"),
    ),
)

LOAD_SIDECAR = """
# TYPE tls_group_total counter
tls_group_total{group="X25519MLKEM768"} 2.0
# TYPE trellis_sidecar_tls_handshakes_total counter
trellis_sidecar_tls_handshakes_total{direction="outbound"} 2.0
# TYPE trellis_sidecar_app_connections_total counter
trellis_sidecar_app_connections_total{direction="outbound"} 8.0
"""
ECHO_SIDECAR = """
# TYPE trellis_sidecar_policy_decisions_total counter
trellis_sidecar_policy_decisions_total{decision="allow"} 8.0
trellis_sidecar_policy_decisions_total{decision="deny"} 0.0
"""
LOAD = """
# TYPE trellis_demo_load_requests_total counter
trellis_demo_load_requests_total{outcome="ok"} 1200
trellis_demo_load_requests_total{outcome="timeout"} 3
# TYPE trellis_demo_load_latency_seconds summary
trellis_demo_load_latency_seconds{quantile="0.5"} 0.0021
trellis_demo_load_latency_seconds{quantile="0.99"} 0.0063
"""
CA = """
# TYPE trellis_ca_x509_svid_issued_total counter
trellis_ca_x509_svid_issued_total{cluster="local",kind="workload",trust_domain="example.org"} 4.0
trellis_ca_x509_svid_issued_total{cluster="local",kind="agent",trust_domain="example.org"} 1.0
"""
AGENT = """
# TYPE trellis_agent_svid_rotations_total counter
trellis_agent_svid_rotations_total{kind="initial"} 2.0
trellis_agent_svid_rotations_total{kind="rotation"} 2.0
"""


def _snapshot(at: float, ok: int = 1200) -> Snapshot:
    return Snapshot(
        at=at,
        elapsed=75,
        metrics={
            "ca": Samples.parse(CA),
            "agent": Samples.parse(AGENT),
            "sidecar-load": Samples.parse(LOAD_SIDECAR),
            "sidecar-echo": Samples.parse(ECHO_SIDECAR),
            "load": Samples.parse(LOAD.replace("1200", str(ok))),
        },
        configs={
            "load": {
                "identity": {
                    "spiffe_id": "spiffe://example.org/ns/demo/sa/load",
                    "serial": "abcdef0123456789",
                    "not_after": "2026-11-26T12:00:41+00:00",
                    "generation": 3,
                }
            },
            "echo": None,
        },
    )


def test_the_status_shows_identities_group_traffic_pooling_policy_issuance_and_endpoints() -> None:
    at = 1795694400.0  # 2026-11-26T12:00:00Z
    text = render(VIEW, _snapshot(at, ok=1250), _snapshot(at - 1.0))
    assert "up 00:01:15" in text
    assert (
        "load     spiffe://example.org/ns/demo/sa/load  41s left, serial abcdef012345,"
        " identity update 3" in text
    )
    assert "echo     spiffe://example.org/ns/demo/sa/echo  no SVID yet" in text
    assert "X25519MLKEM768 (2 handshakes)" in text
    assert "1,253 requests (50/s), 3 errors (timeout 3), latency p50 2.1 ms p99 6.3 ms" in text
    assert "2 TLS handshakes for 8 app connections load->echo (0.25 per app connection)" in text
    assert "echo admits only load: 8 allowed, 0 denied" in text
    assert "CA issued 5 X509-SVIDs (agent 1, workload 4); agent: initial 2, rotation 2" in text
    assert "sidecar-echo     http://127.0.0.1:4/metrics" in text


def test_a_process_that_does_not_answer_is_named_not_hidden() -> None:
    snapshot = Snapshot(at=0.0, elapsed=1, metrics=dict.fromkeys(VIEW.metrics))
    text = render(VIEW, snapshot)
    assert "load generator not answering" in text
    assert "CA and agent not answering" in text
    assert text.count("(not answering)") == len(VIEW.metrics)


def test_the_status_says_which_uids_the_workloads_run_as() -> None:
    note = "not root: every workload runs as uid 1000; told apart by unix:path alone"
    text = render(replace(VIEW, isolation=note), _snapshot(1795694400.0))
    assert f" uids      {note}" in text.splitlines()


def test_the_status_shows_the_admin_endpoints_and_the_check_command_that_reads_them() -> None:
    socket = "/home/ana/trellis up-x/ca.sock"  # a space: the command quotes it for a shell
    view = replace(VIEW, ca_admin_socket=socket, agent_admin="127.0.0.1:2")
    lines = render(view, _snapshot(1795694400.0)).splitlines()
    assert f" admin     CA socket {socket}, agent 127.0.0.1:2" in lines
    assert (
        f" check     trellis check --ca-admin-socket '{socket}' --agent-admin 127.0.0.1:2"
        " --sidecar-admin 127.0.0.1:3 --sidecar-admin 127.0.0.1:4"
    ) in lines


def test_the_pooling_line_counts_resumed_handshakes_and_requests_served_from_0rtt() -> None:
    resumption = """
# TYPE tls_resumption_total counter
tls_resumption_total{kind="psk"} 0.0
tls_resumption_total{kind="ticket"} 1.0
tls_resumption_total{kind="none"} 1.0
"""
    early = """
# TYPE trellis_sidecar_early_data_requests_total counter
trellis_sidecar_early_data_requests_total{decision="served"} 1.0
trellis_sidecar_early_data_requests_total{decision="too_early"} 0.0
"""
    snapshot = _snapshot(1795694400.0)
    metrics = dict(snapshot.metrics)
    metrics["sidecar-load"] = Samples.parse(LOAD_SIDECAR + resumption)
    metrics["sidecar-echo"] = Samples.parse(ECHO_SIDECAR + early)
    text = render(VIEW, replace(snapshot, metrics=metrics))
    assert (
        "2 TLS handshakes for 8 app connections load->echo (0.25 per app connection),"
        " 1 resumed, 1 request served from 0-RTT\n" in text
    )
    # A sidecar that exports no resumption counter is not said to have resumed nothing.
    assert "resumed" not in render(VIEW, snapshot)
