"""What the alert rules fire on, by ``promtool test rules``: Prometheus's own rule engine
evaluating manifests/prometheus/trellis-rules.yml over synthetic series.

Each case is a story told in minutes (promtool's clock starts at 0): a partner whose
fetches fail, one removed from the federation file, one never fetched; an agent whose calls
keep failing, one that recovers, one whose own SVID runs out; a sidecar whose SVID is not
rotated, a namespace whose callers are denied, a pod whose handshakes fail, operator
replicas going down. Then one real firing: a real Prometheus, scraping a real ``trellis ca
serve`` and the operator's real webhook server every second with a copy of the rules whose
``for:`` is 1 s, sees both stopped and fires TrellisCADown, TrellisOperatorDown and
TrellisWebhookDown. ``promtool check rules`` and the PrometheusRule mirror are checked in
test_manifests.py; real series from a running mesh are evaluated in
test_dashboard_prometheus.py.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca import TrustDomain
from trellis.up.identity import create_authorities
from trellis.up.processes import free_ports

from .test_dashboard_prometheus import (
    Prometheus,
    child,
    process,
    scrape_config,
    target_labels,
    wait_for,
    webhook,
)
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


def sidecar(namespace: str, pod: str) -> str:
    return (
        f'cluster="west", trust_domain="example.org", namespace="{namespace}", pod="{pod}", '
        f'instance="{pod}:15020", job="trellis-sidecar"'
    )


def sidecar_labels(namespace: str, pod: str) -> dict[str, str]:
    return {
        "cluster": "west",
        "trust_domain": "example.org",
        "namespace": namespace,
        "pod": pod,
        "instance": f"{pod}:15020",
        "job": "trellis-sidecar",
    }


def test_a_sidecar_whose_svid_is_not_rotated_alerts_and_one_rotating_or_without_one_does_not(
    tmp_path: Path,
) -> None:
    expiry = "trellis_sidecar_svid_expiry_timestamp_seconds"
    series = [
        # shop/a: its SVID expires at 50 minutes and is never replaced.
        {"series": f'{expiry}{{{sidecar("shop", "a")}}}', "values": "3000+0x60"},
        # shop/b: replaced at half-life, every 30 minutes.
        {"series": f'{expiry}{{{sidecar("shop", "b")}}}', "values": "3600+0x29 5400+0x31"},
        # shop/c: holds no SVID yet (0), so it is not ready either.
        {"series": f'{expiry}{{{sidecar("shop", "c")}}}', "values": "0+0x60"},
    ]  # fmt: skip
    name = "TrellisSidecarSVIDCloseToExpiry"
    firing = {
        "exp_labels": {"alertname": name, "severity": "critical", **sidecar_labels("shop", "a")},
        "exp_annotations": {
            "summary": "Sidecar of shop/a presents an SVID expiring in under 10 minutes",
            "description": (
                "Its peers will refuse it once it expires. Check the node's agent "
                "(TrellisSVIDsCloseToExpiry, trellis_agent_upstream_up) and "
                "`trellis proxy status` for that pod."
            ),
        },
    }
    cases = [
        {"eval_time": "40m", "alertname": name, "exp_alerts": []},  # 600 s left
        {"eval_time": "45m", "alertname": name, "exp_alerts": [firing]},
    ]
    promtool_test(tmp_path, series, cases)


def test_a_namespace_with_many_denials_alerts_and_a_trickle_or_a_small_share_does_not(
    tmp_path: Path,
) -> None:
    decisions = "trellis_sidecar_policy_decisions_total"
    series = [
        # shop: 1 denial/s beside 1 allowed/s, from minute 10.
        {"series": f'{decisions}{{{sidecar("shop", "a")}, decision="deny"}}',
         "values": "0x10 60+60x30"},
        {"series": f'{decisions}{{{sidecar("shop", "a")}, decision="allow"}}',
         "values": "0+60x40"},
        # quiet: one denial a minute, half its decisions (under 0.1/s).
        {"series": f'{decisions}{{{sidecar("quiet", "q")}, decision="deny"}}',
         "values": "0+1x40"},
        {"series": f'{decisions}{{{sidecar("quiet", "q")}, decision="allow"}}',
         "values": "0+1x40"},
        # busy: 10 denials a minute among 600 allowed (1.6 %).
        {"series": f'{decisions}{{{sidecar("busy", "b")}, decision="deny"}}',
         "values": "0+10x40"},
        {"series": f'{decisions}{{{sidecar("busy", "b")}, decision="allow"}}',
         "values": "0+600x40"},
    ]  # fmt: skip
    name = "TrellisPolicyDenialSpike"
    firing = {
        "exp_labels": {
            "alertname": name,
            "severity": "warning",
            "cluster": "west",
            "trust_domain": "example.org",
            "namespace": "shop",
        },
        "exp_annotations": {
            "summary": "Sidecars in shop deny 1 streams/s",
            "description": (
                "Callers are refused by AccessPolicy. The sidecars' logs name the caller's "
                "SPIFFE ID and the port; `trellis policy explain` says which rule decides."
            ),
        },
    }
    cases = [
        {"eval_time": "12m", "alertname": name, "exp_alerts": []},  # pending
        {"eval_time": "25m", "alertname": name, "exp_alerts": [firing]},
    ]
    promtool_test(tmp_path, series, cases)


def test_a_pod_whose_handshakes_fail_alerts_and_rare_or_relatively_few_failures_do_not(
    tmp_path: Path,
) -> None:
    failures = "trellis_sidecar_tls_handshake_failures_total"
    done = "trellis_sidecar_tls_handshakes_total"
    series = [
        # shop/a: half its inbound handshakes fail (unknown_ca: a bundle out of date).
        {"series": f'{failures}{{{sidecar("shop", "a")}, direction="inbound", '
                   'reason="unknown_ca"}',
         "values": "0+60x40"},
        {"series": f'{done}{{{sidecar("shop", "a")}, direction="inbound"}}',
         "values": "0+60x40"},
        # shop/b: one failure a minute, nothing else (under 0.05/s).
        {"series": f'{failures}{{{sidecar("shop", "b")}, direction="inbound", reason="eof"}}',
         "values": "0+1x40"},
        # shop/c: 6 failures a minute among 6000 handshakes (0.1 %).
        {"series": f'{failures}{{{sidecar("shop", "c")}, direction="outbound", '
                   'reason="timeout"}',
         "values": "0+6x40"},
        {"series": f'{done}{{{sidecar("shop", "c")}, direction="outbound"}}',
         "values": "0+6000x40"},
    ]  # fmt: skip
    name = "TrellisHandshakeFailures"
    labels = sidecar_labels("shop", "a")
    del labels["instance"], labels["job"]
    firing = {
        "exp_labels": {"alertname": name, "severity": "warning", **labels},
        "exp_annotations": {
            "summary": "TLS handshakes of shop/a fail at 1/s",
            "description": (
                "trellis_sidecar_tls_handshake_failures_total by direction and reason (the TLS "
                "alert) says why; bad_certificate or unknown_ca usually means a trust bundle "
                "out of date."
            ),
        },
    }
    cases = [
        {"eval_time": "10m", "alertname": name, "exp_alerts": []},  # pending
        {"eval_time": "20m", "alertname": name, "exp_alerts": [firing]},
    ]
    promtool_test(tmp_path, series, cases)


def test_a_namespace_whose_resumptions_collapse_alerts_and_a_steady_cold_or_quiet_one_does_not(
    tmp_path: Path,
) -> None:
    """The signal of a STEK rotation without overlap: tickets stop opening at once."""
    resumptions = "tls_resumption_total"
    series = [
        # shop: two pods, 48 of every 60 handshakes a minute resumed, until minute 80 when
        # every ticket stops opening and each handshake is a full one.
        *(
            {"series": f'{resumptions}{{{sidecar("shop", pod)}, kind="{kind}"}}',
             "values": values}
            for pod in ("a", "b")
            for kind, values in (("ticket", "0+48x80 3840+0x20"), ("none", "0+12x80 960+60x20"))
        ),
        # steady: the same share all along (a rotation with overlap costs nothing).
        {"series": f'{resumptions}{{{sidecar("steady", "s")}, kind="ticket"}}',
         "values": "0+48x100"},
        {"series": f'{resumptions}{{{sidecar("steady", "s")}, kind="none"}}',
         "values": "0+12x100"},
        # cold: never resumed (a workload called once per pod start).
        {"series": f'{resumptions}{{{sidecar("cold", "c")}, kind="ticket"}}',
         "values": "0+0x100"},
        {"series": f'{resumptions}{{{sidecar("cold", "c")}, kind="none"}}',
         "values": "0+60x100"},
        # quiet: the same collapse at one handshake a minute (under 0.1/s).
        {"series": f'{resumptions}{{{sidecar("quiet", "q")}, kind="ticket"}}',
         "values": "0+1x80 80+0x20"},
        {"series": f'{resumptions}{{{sidecar("quiet", "q")}, kind="none"}}',
         "values": "0+0x80 0+1x20"},
    ]  # fmt: skip
    name = "TrellisResumptionRatioDrop"
    firing = {
        "exp_labels": {
            "alertname": name,
            "severity": "warning",
            "cluster": "west",
            "trust_domain": "example.org",
            "namespace": "shop",
        },
        "exp_annotations": {
            "summary": "Sidecars in shop resume only 0% of their handshakes",
            "description": (
                "Under half the resumption ratio of the hour before: session tickets stopped "
                "opening. trellis_stek_decrypt_failures_total by reason says why (unknown_key: "
                "a STEK rotated out before its tickets expired; expired: a ring that aged out), "
                "and trellis_stek_active_key_age_seconds whether the sidecars still receive keys."
            ),
        },
    }
    cases = [
        {"eval_time": "78m", "alertname": name, "exp_alerts": []},  # before the collapse
        {"eval_time": "84m", "alertname": name, "exp_alerts": []},  # pending
        {"eval_time": "95m", "alertname": name, "exp_alerts": [firing]},
    ]
    promtool_test(tmp_path, series, cases)


def operator(pod: str) -> dict[str, str]:
    return {
        "cluster": "west",
        "trust_domain": "example.org",
        "namespace": "trellis-system",
        "pod": pod,
        "instance": f"{pod}:9443",
        "job": "trellis-operator",
    }


def test_operator_replicas_going_down_one_then_all_alert_as_the_webhook_then_the_operator(
    tmp_path: Path,
) -> None:
    def up(pod: str) -> str:
        return "up{" + ", ".join(f'{k}="{v}"' for k, v in operator(pod).items()) + "}"

    expiry = "trellis_operator_webhook_certificate_expiry_timestamp_seconds"
    series = [
        # operator-a answers for 20 minutes; operator-b stops answering at minute 5.
        {"series": up("operator-a"), "values": "1x20 0x20"},
        {"series": up("operator-b"), "values": "1x4 0x36"},
        # operator-a serves a certificate with 7 days and 10 minutes left at minute 0.
        {"series": f"{expiry}{{{up('operator-a')[3:-1]}}}", "values": "605400+0x40"},
    ]  # fmt: skip

    def webhook_down(pod: str) -> dict[str, Any]:
        return {
            "exp_labels": {
                "alertname": "TrellisWebhookDown",
                "severity": "warning",
                **operator(pod),
            },
            "exp_annotations": {
                "summary": f"The webhook of {pod} does not answer",
                "description": (
                    "Admission calls routed to it fail until the replica is taken out of the "
                    "Service. Look at that pod's events and logs."
                ),
            },
        }

    operator_down = {
        "exp_labels": {"alertname": "TrellisOperatorDown", "severity": "critical"},
        "exp_annotations": {
            "summary": "No trellis-operator replica answers",
            "description": (
                "Pods in injected namespaces cannot be created (the webhook's failurePolicy is "
                "Fail) and identity and policy changes are not reconciled. Look at `kubectl -n "
                "trellis-system get pods -l app.kubernetes.io/name=trellis-operator` and the "
                "operator's logs."
            ),
        },
    }
    expiring = {
        "exp_labels": {
            "alertname": "TrellisWebhookCertificateExpiresSoon",
            "severity": "warning",
            **operator("operator-a"),
        },
        "exp_annotations": {
            "summary": "The webhook certificate served by operator-a expires in under 7 days",
            "description": (
                "The operator leader is not renewing the trellis-webhook-tls Secret, or the pod "
                "does not see the renewed copy. Run `trellis check` and read the leader's logs."
            ),
        },
    }
    cases = [
        {"eval_time": "3m", "alertname": "TrellisWebhookDown", "exp_alerts": []},
        {"eval_time": "10m", "alertname": "TrellisWebhookDown",
         "exp_alerts": [webhook_down("operator-b")]},
        {"eval_time": "10m", "alertname": "TrellisOperatorDown", "exp_alerts": []},
        {"eval_time": "25m", "alertname": "TrellisOperatorDown", "exp_alerts": [operator_down]},
        {"eval_time": "25m", "alertname": "TrellisWebhookDown",
         "exp_alerts": [webhook_down("operator-a"), webhook_down("operator-b")]},
        # Under 7 days from minute 10, for 15 minutes.
        {"eval_time": "20m", "alertname": "TrellisWebhookCertificateExpiresSoon",
         "exp_alerts": []},
        {"eval_time": "26m", "alertname": "TrellisWebhookCertificateExpiresSoon",
         "exp_alerts": [expiring]},
    ]  # fmt: skip
    promtool_test(tmp_path, series, cases)


def test_a_ca_never_scraped_at_all_is_down(tmp_path: Path) -> None:
    """The Deployment scaled to 0 leaves no endpoints, hence no target and no ``up``."""
    series = [{"series": 'up{job="trellis-agent", instance="node-a:8089"}', "values": "1x10"}]
    firing = {
        "exp_labels": {"alertname": "TrellisCADown", "severity": "critical", "job": "trellis-ca"},
        "exp_annotations": {
            "summary": "No CA of cluster  answers",
            "description": (
                "Agents serve cached SVIDs until they expire; no new workload gets an identity. "
                "Run `trellis check`, then `kubectl -n trellis-system get pods -l "
                "app.kubernetes.io/name=trellis-ca` and the CA's logs."
            ),
        },
    }
    cases = [
        {"eval_time": "1m", "alertname": "TrellisCADown", "exp_alerts": []},  # pending
        {"eval_time": "3m", "alertname": "TrellisCADown", "exp_alerts": [firing]},
    ]
    promtool_test(tmp_path, series, cases)


def quick_rules(directory: Path) -> Path:
    """The rules as shipped, but every ``for:`` 1 s: the test waits seconds, not minutes."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["for"] = "1s"
    path = directory / "trellis-rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_stopping_the_ca_and_the_webhook_fires_their_down_alerts(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus missing: apt-get install --no-install-recommends prometheus")
    host, trust_domain, cluster = "127.0.0.1", TrustDomain("example.org"), "west"
    metrics, prometheus_port = free_ports(2)
    create_authorities(tmp_path / "ca", trust_domain, cluster)
    down = {"TrellisCADown", "TrellisOperatorDown", "TrellisWebhookDown"}
    with contextlib.ExitStack() as stack:
        ca = stack.enter_context(
            child(
                "ca",
                [
                    "ca", "serve", "--dir", str(tmp_path / "ca"), "--cluster", cluster,
                    "--listen", f"{host}:0", "--attest-listen", f"{host}:0",
                    "--bundle-listen", "off", "--metrics-listen", f"{host}:{metrics}",
                    "--sign-workers", "0",
                ],
                tmp_path,
            )
        )  # fmt: skip
        ca.wait_event("ready", 30)
        address, ca_file, hook = stack.enter_context(webhook(host, tmp_path))
        labels = target_labels(trust_domain.name, cluster, "trellis-system")
        jobs = {
            "trellis-ca": [(f"{host}:{metrics}", labels)],
            "trellis-operator": [(address, labels)],
        }
        config = scrape_config(jobs, quick_rules(tmp_path), ca_file)
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        stack.enter_context(
            process(
                [
                    binary,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={host}:{prometheus_port}",
                ],
                tmp_path / "prometheus.log",
            )
        )
        prom = Prometheus(f"http://{host}:{prometheus_port}")

        def alerts() -> dict[str, list[dict[str, Any]]]:
            found: dict[str, list[dict[str, Any]]] = {}
            for alert in prom.get("/api/v1/alerts")["data"]["alerts"]:
                found.setdefault(alert["labels"]["alertname"], []).append(alert)
            return found

        def both_up_and_rules_evaluated() -> bool:
            try:
                answering = prom.query("up == 1")["data"]["result"]
                groups = prom.get("/api/v1/rules")["data"]["groups"]
            except OSError:
                return False
            # Go's zero time until a group's first evaluation.
            evaluated = all(not g["lastEvaluation"].startswith("0001") for g in groups)
            return len(answering) == 2 and evaluated

        wait_for("Prometheus to scrape the CA and the webhook", both_up_and_rules_evaluated)
        time.sleep(2)  # two more rule evaluations over the healthy targets
        assert not down & set(alerts()), alerts()

        ca.stop()
        hook.terminate()
        hook.wait(10)

        def fired() -> dict[str, list[dict[str, Any]]] | None:
            now = alerts()
            firing = {name for name, found in now.items() if found[0]["state"] == "firing"}
            return now if down <= firing else None

        now = wait_for("the down alerts to fire", fired, timeout=30)
        (ca_down,) = now["TrellisCADown"]
        assert ca_down["labels"] == {
            "alertname": "TrellisCADown",
            "severity": "critical",
            "cluster": cluster,
            "trust_domain": trust_domain.name,
        }
        assert ca_down["annotations"]["summary"] == f"No CA of cluster {cluster} answers"
        (webhook_down,) = now["TrellisWebhookDown"]
        assert webhook_down["labels"]["instance"] == address
