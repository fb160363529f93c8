"""What the agent and federation alert rules fire on, by ``promtool test rules``: Prometheus's
own rule engine evaluating manifests/prometheus/trellis-rules.yml over synthetic series.

Each case is a story told in minutes (promtool's clock starts at 0): a partner whose
fetches fail, one removed from the federation file, one never fetched; an agent whose calls
keep failing, one that recovers, one whose own SVID runs out. ``promtool check rules`` and
the PrometheusRule mirror are checked in test_manifests.py; real series from a running
mesh are evaluated in test_dashboard_prometheus.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from .test_manifests import MANIFESTS, promtool

RULES = MANIFESTS / "prometheus" / "trellis-rules.yml"

CA = 'trust_domain="example.org", cluster="west", instance="ca-0:9090", job="trellis-ca"'
CA_LABELS = {
    "trust_domain": "example.org",
    "cluster": "west",
    "instance": "ca-0:9090",
    "job": "trellis-ca",
}
LAST_SUCCESS = "trellis_ca_federation_last_success_timestamp_seconds"
FETCHES = "trellis_ca_federation_fetch_total"


def agent(node: str) -> str:
    return f'node="{node}", instance="{node}:9091", job="trellis-agent"'


def agent_labels(node: str) -> dict[str, str]:
    return {"node": node, "instance": f"{node}:9091", "job": "trellis-agent"}


def promtool_test(tmp_path: Path, series: list[dict[str, str]], cases: list[Any]) -> None:
    doc = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": cases}],
    }
    path = tmp_path / "rules-test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def stale(partner: str, age: str) -> dict[str, Any]:
    return {
        "exp_labels": {
            "alertname": "TrellisFederatedBundleStale",
            "severity": "warning",
            "federated_trust_domain": partner,
            **CA_LABELS,
        },
        "exp_annotations": {
            "summary": f"CA west holds no fresh bundle of {partner}",
            "description": (
                f"No successful fetch for {age}. The last good bundle stays in force but "
                "misses the partner's root rotations. Look at trellis_ca_federation_fetch_total "
                "by outcome and the CA's federation-fetch-failed logs."
            ),
        },
    }


def test_a_partner_whose_fetches_keep_failing_or_never_succeeded_is_stale_and_no_other(
    tmp_path: Path,
) -> None:
    series = [
        # healthy.org: fetched every minute, each fetch a success.
        {"series": f'{LAST_SUCCESS}{{{CA}, federated_trust_domain="healthy.org"}}',
         "values": "0+60x90"},
        {"series": f'{FETCHES}{{{CA}, federated_trust_domain="healthy.org", outcome="ok"}}',
         "values": "0+1x90"},
        # failing.org: a success at minute 10, then nothing but unreachable.
        {"series": f'{LAST_SUCCESS}{{{CA}, federated_trust_domain="failing.org"}}',
         "values": "0x9 600+0x80"},
        {"series": f'{FETCHES}{{{CA}, federated_trust_domain="failing.org", outcome="ok"}}',
         "values": "0x9 1+0x80"},
        {"series": f'{FETCHES}{{{CA}, federated_trust_domain="failing.org", '
                   'outcome="unreachable"}',
         "values": "0x10 1+1x80"},
        # removed.org: a success at minute 10, then dropped from the federation file: no
        # more attempts, the stamp stays where it was until the CA restarts.
        {"series": f'{LAST_SUCCESS}{{{CA}, federated_trust_domain="removed.org"}}',
         "values": "0x9 600+0x80"},
        {"series": f'{FETCHES}{{{CA}, federated_trust_domain="removed.org", outcome="ok"}}',
         "values": "0x9 1+0x80"},
        # never.org: every fetch refused from the start (the stamp is 0).
        {"series": f'{LAST_SUCCESS}{{{CA}, federated_trust_domain="never.org"}}',
         "values": "0+0x90"},
        {"series": f'{FETCHES}{{{CA}, federated_trust_domain="never.org", '
                   'outcome="endpoint-unauthenticated"}',
         "values": "1+1x90"},
    ]  # fmt: skip
    name = "TrellisFederatedBundleStale"
    cases = [
        # 20 minutes without a success: not yet stale.
        {"eval_time": "30m", "alertname": name, "exp_alerts": []},
        # Over 30 minutes since 40m (never.org since 30m), and 10 more of it.
        {"eval_time": "55m", "alertname": name,
         "exp_alerts": [stale("failing.org", "45m 0s"), stale("never.org", "55m 0s")]},
    ]  # fmt: skip
    promtool_test(tmp_path, series, cases)


def test_an_agent_failing_for_15_minutes_alerts_and_one_that_recovered_does_not(
    tmp_path: Path,
) -> None:
    errors = "trellis_agent_upstream_fetch_errors_total"
    series = [
        # node-a: a refusal every minute from the start (a banned node).
        {"series": f'{errors}{{{agent("node-a")}, operation="fetch_entries", retryable="false"}}',
         "values": "1+1x60"},
        # node-b: failed calls for 10 minutes, then none.
        {"series": f'{errors}{{{agent("node-b")}, operation="batch_new_x509_svids", '
                   'retryable="true"}',
         "values": "1+1x10 11+0x50"},
        # node-c: one error long ago.
        {"series": f'{errors}{{{agent("node-c")}, operation="renew", retryable="true"}}',
         "values": "1+0x60"},
    ]  # fmt: skip
    name = "TrellisAgentFetchErrors"
    firing = {
        "exp_labels": {"alertname": name, "severity": "warning", **agent_labels("node-a")},
        "exp_annotations": {
            "summary": "Agent on node-a has had failing calls to the CA for 15 minutes",
            "description": (
                "16.67m failed calls/s. trellis_agent_upstream_refusals_total says which ones "
                "the CA refused and why; the rest are retried with backoff."
            ),
        },
    }
    cases = [
        {"eval_time": "12m", "alertname": name, "exp_alerts": []},  # pending only
        {"eval_time": "30m", "alertname": name, "exp_alerts": [firing]},
    ]
    promtool_test(tmp_path, series, cases)


def test_an_agent_whose_own_svid_runs_out_alerts_and_one_without_an_svid_does_not(
    tmp_path: Path,
) -> None:
    expiry = "trellis_agent_agent_svid_expiry_seconds"
    series = [
        # node-a: renewal fails from the start; 50 minutes left, one less each minute.
        {"series": f"{expiry}{{{agent('node-a')}}}", "values": "3000-60x60"},
        # node-b: renews at half-life, always over half an hour left.
        {"series": f"{expiry}{{{agent('node-b')}}}", "values": "3600-60x30 3600-60x29"},
        # node-c: not attested yet (-1).
        {"series": f"{expiry}{{{agent('node-c')}}}", "values": "-1+0x60"},
    ]
    name = "TrellisAgentSVIDCloseToExpiry"
    firing = {
        "exp_labels": {"alertname": name, "severity": "critical", **agent_labels("node-a")},
        "exp_annotations": {
            "summary": "Agent on node-a holds its own SVID for under 10 more minutes",
            "description": (
                "The agent cannot renew its identity. Check trellis_agent_upstream_refusals_total "
                "(permission-denied: the node is banned) and the agent's logs."
            ),
        },
    }
    cases = [
        {"eval_time": "39m", "alertname": name, "exp_alerts": []},  # 660 s left
        {"eval_time": "45m", "alertname": name, "exp_alerts": [firing]},
    ]
    promtool_test(tmp_path, series, cases)
