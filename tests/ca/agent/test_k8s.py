"""Kubernetes attestation from recorded cgroup files and pod objects.

No kube-apiserver runs on these machines, so ``watch_pods`` is exercised against a small
fake endpoint (aiohttp) speaking the real list/watch JSON; everything else is fed recorded
``/proc/<pid>/cgroup`` files and v1 Pod objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

import pytest
from aiohttp import web

from ca.agent.attestation import AttestationPending, PeerCredentials, WorkloadAttributes
from ca.agent.k8s import (
    InClusterConfig,
    PodAttestor,
    PodIndex,
    pod_from_object,
    pod_uid_from_cgroups,
    watch_pods,
)
from ca.agent.workload_client import WorkloadClient
from ca.entries import parse_selector
from tests.ca.agent.conftest import LiveCa, entry, make_upstream, run, running_agent

DATA = Path(__file__).parent / "data"
WEB_UID = "7a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"
DB_UID = "11111111-2222-3333-4444-555555555555"


def _lines(name: str) -> list[str]:
    return (DATA / name).read_text().splitlines()


def test_the_pod_uid_comes_from_a_cgroupfs_v1_path() -> None:
    assert pod_uid_from_cgroups(_lines("cgroup-v1-cgroupfs.txt")) == (
        "3f5c1a4e-8b2d-4c6e-9f1a-2b3c4d5e6f70"
    )


def test_the_pod_uid_comes_from_a_systemd_v2_slice_with_underscores() -> None:
    assert pod_uid_from_cgroups(_lines("cgroup-v2-systemd.txt")) == WEB_UID


def test_guaranteed_pods_have_no_qos_slice_and_still_attest() -> None:
    assert pod_uid_from_cgroups(_lines("cgroup-v2-guaranteed-crio.txt")) == DB_UID


def test_a_host_process_has_no_pod() -> None:
    assert pod_uid_from_cgroups(_lines("cgroup-host-process.txt")) is None


def test_a_pod_object_becomes_namespace_service_account_label_and_node_selectors() -> None:
    pod = pod_from_object(json.loads((DATA / "pod-web.json").read_text()))
    assert pod is not None
    texts = {str(s) for s in pod.selectors()}
    assert {
        "k8s:ns:shop",
        "k8s:sa:web",
        "k8s:node-name:node-a",
        "k8s:pod-label:app:web",
        "k8s:pod-label:app.kubernetes.io/part-of:shop",
    } <= texts
    # Every selector the agent produces is one the CA's entry model can express.
    assert all(parse_selector(t) for t in texts)


def test_the_pod_attestor_maps_a_callers_cgroup_to_its_pods_selectors() -> None:
    index = PodIndex()
    index.replace([json.loads((DATA / "pod-web.json").read_text())], "48213")
    attrs = WorkloadAttributes(
        PeerCredentials(1, 1000, 1000), cgroups=tuple(_lines("cgroup-v2-systemd.txt"))
    )
    found = PodAttestor(index).selectors(attrs)
    assert parse_selector("k8s:sa:web") in found
    unknown = WorkloadAttributes(
        PeerCredentials(1, 1000, 1000), cgroups=tuple(_lines("cgroup-v1-cgroupfs.txt"))
    )
    with pytest.raises(AttestationPending):  # a pod the watch has not delivered yet
        PodAttestor(index).selectors(unknown)
    host = WorkloadAttributes(
        PeerCredentials(1, 0, 0), cgroups=tuple(_lines("cgroup-host-process.txt"))
    )
    assert PodAttestor(index).selectors(host) == frozenset()


def test_watch_events_add_modify_and_delete_pods() -> None:
    index = PodIndex()
    index.replace([json.loads((DATA / "pod-web.json").read_text())], "48213")
    for line in _lines("pod-watch-events.jsonl"):
        assert index.apply(json.loads(line))
    assert index.get(WEB_UID) is None
    db = index.get(DB_UID)
    assert db is not None and db.labels == {"app": "db", "tier": "data"}
    assert index.resource_version == "48320"


def test_an_error_event_asks_for_a_fresh_list() -> None:
    index = PodIndex()
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}
    assert not index.apply(gone)


def test_watch_pods_lists_then_follows_the_watch_of_a_fake_api_server(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("fake-sa-token\n")
    seen: list[dict[str, str]] = []

    async def pods(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.query) | {"auth": request.headers.get("Authorization", "")})
        if request.query.get("watch") != "true":
            pod = json.loads((DATA / "pod-web.json").read_text())
            return web.json_response(
                {"kind": "PodList", "metadata": {"resourceVersion": "48213"}, "items": [pod]}
            )
        response = web.StreamResponse()
        await response.prepare(request)
        for line in _lines("pod-watch-events.jsonl"):
            await response.write(line.encode() + b"\n")
        await asyncio.sleep(0.2)  # an idle watch that then ends, as the API server does
        return response

    async def main() -> PodIndex:
        app = web.Application()
        app.router.add_get("/api/v1/pods", pods)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        config = InClusterConfig(f"http://127.0.0.1:{port}", token_path=token, ca_path=None)
        index = PodIndex()
        task = asyncio.create_task(watch_pods(config, "node-a", index))
        for _ in range(200):
            if index.resource_version == "48320":
                break
            await asyncio.sleep(0.02)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
        return index

    index = run(main(), timeout=20)
    assert index.get(DB_UID) is not None and index.get(WEB_UID) is None
    assert seen[0]["fieldSelector"] == "spec.nodeName=node-a"
    assert seen[0]["auth"] == "Bearer fake-sa-token"
    assert seen[1]["watch"] == "true" and seen[1]["resourceVersion"] == "48213"


def test_a_pod_gets_the_identity_its_namespace_and_service_account_entry_names(
    live_ca: LiveCa, short_dir: Path, tmp_path: Path
) -> None:
    # The caller is this test process; a proc root holding its real stat and exe but the
    # recorded cgroup of a pod makes it look like a container of pod-web.json to the agent.
    me = tmp_path / "proc" / str(os.getpid())
    me.mkdir(parents=True)
    (me / "stat").write_text(Path(f"/proc/{os.getpid()}/stat").read_text())
    (me / "cgroup").write_text((DATA / "cgroup-v2-systemd.txt").read_text())
    (me / "exe").symlink_to(os.path.realpath(f"/proc/{os.getpid()}/exe"))
    index = PodIndex()
    index.replace([json.loads((DATA / "pod-web.json").read_text())], "48213")
    shop_web = entry(
        "spiffe://example.org/ns/shop/sa/web",
        ["k8s:ns:shop", "k8s:sa:web", "k8s:pod-label:app:web"],
    )
    other_sa = entry("spiffe://example.org/ns/shop/sa/db", ["k8s:ns:shop", "k8s:sa:db"])

    async def main() -> list[str]:
        upstream = make_upstream(live_ca, [shop_web, other_sa])
        async with running_agent(
            upstream, short_dir, proc_root=tmp_path / "proc", plugins=(PodAttestor(index),)
        ) as agent:
            client = WorkloadClient(f"unix:{agent.config.socket_path}")
            response = await asyncio.to_thread(client.fetch_x509_svid)
            client.close()
            return [s.spiffe_id for s in response.svids]

    assert run(main()) == ["spiffe://example.org/ns/shop/sa/web"]
