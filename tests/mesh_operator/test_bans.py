"""The CA's ban list kept from Node labels: the pure core, and one sync the real API server
cannot set up.

Syncs against a real kube-apiserver are in tests/kube/test_bans_sync.py and
tests/kube/test_operator.py. The one left here needs a Node whose name the CA cannot hold,
which kube-apiserver refuses to store, so it runs against ``fake_apiserver.FakeApiServer``.
Every ban list the operator writes is read back with the CA's own loader
(``ca.server.bans``), so a list the CA would refuse fails here.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from ca.server.bans import load_ban_list, parse_ban_list
from ca.spiffeid import TrustDomain
from mesh_operator.bans import BAN_LABEL, BanList, adoption_problem, ban_list
from mesh_operator.handlers import OperatorConfig, OperatorState, SyncReport, sync_once
from mesh_operator.kube import MANAGED_BY, KubeClient

from .conftest import run
from .fake_apiserver import FakeApiServer, running

NAMESPACE = "trellis-system"
CONFIG_MAP = "trellis-banned-agents"


# --- the pure core ----------------------------------------------------------------------


def test_nodes_labelled_true_are_banned_sorted_and_false_lifts_the_ban() -> None:
    bans = ban_list({"node-c": "true", "node-a": "true", "node-b": "false"})
    assert bans == BanList(("node-a", "node-c"))
    assert parse_ban_list(bans.text()) == {"node-a", "node-c"}
    assert bans.text().splitlines()[-2:] == ["- node-a", "- node-c"]


def test_no_banned_node_gives_a_list_the_ca_reads_as_empty() -> None:
    for labels in ({}, {"node-a": "false"}):
        bans = ban_list(labels)
        assert bans.nodes == ()
        assert parse_ban_list(bans.text()) == frozenset()


def test_node_names_yaml_would_read_as_numbers_or_keywords_stay_strings() -> None:
    names = ["123", "1e3", "0x1f", "null", "yes", "on", "true", "1.5", "node-a"]
    bans = ban_list(dict.fromkeys(names, "true"))
    assert parse_ban_list(bans.text()) == set(names)


@pytest.mark.parametrize("value", ["True", "yes", "1", "", "banned"])
def test_an_unexpected_label_value_bans_the_node_and_says_so(value: str) -> None:
    bans = ban_list({"node-a": value, "node-b": "true"})
    assert bans.nodes == ("node-a", "node-b")
    (problem,) = bans.problems
    assert f"Node node-a has {BAN_LABEL}={value!r}" in problem
    assert "neither true nor false; banned anyway" in problem


@pytest.mark.parametrize("name", ["bad name", "-leading-dash", "node/a", "x" * 300, "nöde"])
def test_a_node_name_the_ca_cannot_hold_is_left_out_and_reported(name: str) -> None:
    bans = ban_list({name: "true", "node-a": "true"})
    assert bans.nodes == ("node-a",)
    (problem,) = bans.problems
    assert "its name cannot be listed for the CA" in problem and "left out" in problem
    # the rest of the list still reaches the CA: one bad name does not spoil the file
    assert parse_ban_list(bans.text()) == {"node-a"}


def test_the_list_the_operator_writes_loads_with_the_cas_file_loader(tmp_path: Path) -> None:
    path = tmp_path / "banned.yaml"
    path.write_text(ban_list({"node-b": "true", "node-a": "true"}).text())
    assert load_ban_list(path) == {"node-a", "node-b"}


def config_map(text: str, *, managed: bool) -> dict[str, Any]:
    labels = dict(MANAGED_BY) if managed else {"app.kubernetes.io/part-of": "trellis"}
    return {
        "metadata": {"name": CONFIG_MAP, "namespace": NAMESPACE, "labels": labels},
        "data": {"banned.yaml": text},
    }


def test_a_hand_written_list_banning_unlabelled_nodes_is_not_overwritten() -> None:
    current = config_map("- node-a\n- node-b\n", managed=False)
    problem = adoption_problem(current, False, ban_list({"node-a": "true"}))
    assert problem is not None
    assert "bans node-b, which carries no trellis.dev/agent-banned=true label" in problem
    assert "kubectl label node NAME trellis.dev/agent-banned=true" in problem


@pytest.mark.parametrize(
    ("current", "managed"),
    [
        (None, False),  # nothing there yet
        (config_map("[]\n", managed=False), False),  # as kustomize ships it
        (config_map("- node-a\n", managed=False), False),  # every listed node is labelled
        (config_map("- node-b\n", managed=True), True),  # the operator's own: edits lose
        (config_map("- : not a list\n", managed=False), False),  # the CA cannot read it
    ],
)
def test_the_operator_takes_over_lists_that_lift_no_ban(
    current: dict[str, Any] | None, managed: bool
) -> None:
    assert adoption_problem(current, managed, ban_list({"node-a": "true"})) is None


# --- one sync against the fake API server ----------------------------------------------


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def ban_config_map(text: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIG_MAP, "namespace": NAMESPACE, "labels": labels},
        "data": {"banned.yaml": text},
    }


async def sync(server: FakeApiServer) -> SyncReport:
    configuration = kubernetes.client.Configuration()
    configuration.host = server.url
    configuration.retries = 0
    client = KubeClient(kubernetes.client.ApiClient(configuration))
    config = OperatorConfig(trust_domain=TrustDomain("example.org"))
    return await sync_once(config, OperatorState(), client, now=dt.datetime.now(dt.UTC))


def banned(server: FakeApiServer) -> frozenset[str]:
    cm = server.get("configmaps", CONFIG_MAP, NAMESPACE)
    return parse_ban_list(cm["data"]["banned.yaml"])


def test_a_node_name_the_ca_cannot_hold_is_left_out_of_a_synced_list() -> None:
    """A real API server refuses such a Node name; only the fake can store one, so this
    case stays here (the other syncs run against kube-apiserver in tests/kube/)."""

    async def body() -> None:
        async with running(FakeApiServer()) as server:
            server.put(node("bad name", **{BAN_LABEL: "true"}))  # only a fake admits this
            server.put(node("worker-1", **{BAN_LABEL: "true"}))
            report = await sync(server)
            assert banned(server) == {"worker-1"}
            (problem,) = report.ban_problems
            assert "'bad name'" in problem and "left out" in problem

    run(body())
