"""The agent's CSI node plugin, driven over its real gRPC Unix socket as the kubelet does.

The plugin bind-mounts the agent's socket directory into a directory laid out like the
kubelet's (``<pods>/<uid>/volumes/kubernetes.io~csi/<volume>/mount``) in a temporary
tree; the mounts are real (the tests need root, as the plugin does on a node). The agent is
the in-process one of ``conftest.py``; the workload is py-spiffe in a separate process
running as another user, so the agent's SO_PEERCRED attestation sees that user.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import stat
import subprocess
import sys
import sysconfig
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from ca import RootAuthority, TrustDomain
from ca.agent._csi_proto import csi_pb2, csi_pb2_grpc
from ca.agent.csi import DRIVER_NAME, CsiConfig, start_csi_server
from tests.ca.agent.conftest import LiveCa, entry, make_upstream, run, running_agent
from tests.support import wait_for

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="mounting needs root, as on a node")

NOBODY = 65534
# Another uid cannot run this interpreter (it may sit under root's private home): the
# system interpreter of the same version runs py-spiffe from this environment's packages.
SYSTEM_PYTHON = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
SITE_PACKAGES = sysconfig.get_paths()["purelib"]
POD_UID = "0b7d6d2c-5f0e-4a53-9d8e-3f1e7a2c9b11"
REPO = Path(__file__).resolve().parents[3]
OTHER = "spiffe://example.org/ns/default/sa/other"


def _target(pods: Path, volume: str = "trellis-agent-socket") -> Path:
    return pods / POD_UID / "volumes" / "kubernetes.io~csi" / volume / "mount"


def _publish_request(target: Path | str, **overrides: object) -> csi_pb2.NodePublishVolumeRequest:
    fields: dict[str, object] = {
        "volume_id": f"csi-{POD_UID}",
        "target_path": str(target),
        "volume_capability": csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY
            ),
        ),
        "readonly": True,
        # What the kubelet sends for a CSI ephemeral inline volume.
        "volume_context": {
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/pod.uid": POD_UID,
        },
    }
    fields.update(overrides)
    return csi_pb2.NodePublishVolumeRequest(**fields)  # type: ignore[arg-type]


def _mount_count(path: Path) -> int:
    # The kernel's table: os.path.ismount misses a bind mount from the same filesystem.
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return sum(1 for line in lines if line.split(" ")[4] == str(path))


def _mounts_under(root: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split(" ")[4] for line in lines if line.split(" ")[4].startswith(f"{root}/")]


class Plugin:
    def __init__(self, channel: grpc.aio.Channel, root: Path, source: Path) -> None:
        self.identity = csi_pb2_grpc.IdentityStub(channel)
        self.node = csi_pb2_grpc.NodeStub(channel)
        self.pods = root / "pods"
        self.source = source

    def make_pod_dirs(self, volume: str = "trellis-agent-socket") -> Path:
        target = _target(self.pods, volume)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target


@contextlib.asynccontextmanager
async def running_plugin(root: Path, source: Path) -> AsyncIterator[Plugin]:
    socket_path = root / "csi" / "csi.sock"
    config = CsiConfig(source_dir=source, node_id="node-a", pods_dir=root / "pods")
    (root / "pods").mkdir(exist_ok=True)
    server = await start_csi_server(config, socket_path)
    try:
        async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
            yield Plugin(channel, root, source)
    finally:
        await server.stop(None)
        # Never leave a mount behind in a temporary directory that is about to be removed,
        # wherever a failing plugin may have put it.
        for mount in _mounts_under(root):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)


def _source_with_socket(root: Path) -> Path:
    source = root / "agent"
    source.mkdir()
    (source / "agent.sock").write_bytes(b"")
    return source


def test_plugin_names_itself_is_ready_and_asks_for_no_staging(short_dir: Path) -> None:
    source = _source_with_socket(short_dir)

    async def main() -> tuple[object, ...]:
        async with running_plugin(short_dir, source) as plugin:
            info = await plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
            caps = await plugin.identity.GetPluginCapabilities(
                csi_pb2.GetPluginCapabilitiesRequest()
            )
            probe = await plugin.identity.Probe(csi_pb2.ProbeRequest())
            node_caps = await plugin.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
            node_info = await plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
            return info, caps, probe, node_caps, node_info

    info, caps, probe, node_caps, node_info = run(main(), timeout=30)
    assert info.name == DRIVER_NAME  # type: ignore[attr-defined]
    assert list(caps.capabilities) == []  # type: ignore[attr-defined]  # no controller
    assert probe.ready.value is True  # type: ignore[attr-defined]
    assert list(node_caps.capabilities) == []  # type: ignore[attr-defined]
    assert node_info.node_id == "node-a"  # type: ignore[attr-defined]


def test_publish_bind_mounts_the_socket_dir_read_only_and_unpublish_removes_it(
    short_dir: Path,
) -> None:
    source = _source_with_socket(short_dir)

    async def main() -> dict[str, object]:
        seen: dict[str, object] = {}
        async with running_plugin(short_dir, source) as plugin:
            target = plugin.make_pod_dirs()
            await plugin.node.NodePublishVolume(_publish_request(target))
            seen["mounted"] = _mount_count(target) == 1
            seen["socket_visible"] = (target / "agent.sock").exists()
            try:
                (target / "planted").write_bytes(b"x")
                seen["write"] = "allowed"
            except OSError as exc:
                seen["write"] = exc.errno
            # CSI spec: publishing the same volume again succeeds and mounts nothing more.
            await plugin.node.NodePublishVolume(_publish_request(target))
            seen["mounts_after_second_publish"] = _mount_count(target)
            request = csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=f"csi-{POD_UID}", target_path=str(target)
            )
            await plugin.node.NodeUnpublishVolume(request)
            seen["after_unpublish"] = target.exists()
            await plugin.node.NodeUnpublishVolume(request)  # idempotent too
            seen["source_intact"] = (source / "agent.sock").exists()
        return seen

    seen = run(main(), timeout=30)
    assert seen["mounted"] is True
    assert seen["socket_visible"] is True
    assert seen["write"] == 30  # EROFS: the pod uses the socket, never writes the agent's dir
    assert seen["mounts_after_second_publish"] == 1
    assert seen["after_unpublish"] is False
    assert seen["source_intact"] is True


@pytest.mark.parametrize(
    "overrides",
    [
        {"volume_id": ""},
        {"target_path": ""},
        {"target_path": "relative/mount"},
        {"volume_capability": None},
        {
            "volume_capability": csi_pb2.VolumeCapability(
                block=csi_pb2.VolumeCapability.BlockVolume()
            )
        },
        {"readonly": False},
    ],
    ids=["no-volume-id", "no-target", "relative-target", "no-capability", "block", "writable"],
)
def test_malformed_publish_requests_are_invalid_argument_and_mount_nothing(
    short_dir: Path, overrides: dict[str, object]
) -> None:
    source = _source_with_socket(short_dir)
    mountinfo_before = Path("/proc/self/mountinfo").read_text().count(str(short_dir))

    async def main() -> grpc.StatusCode:
        async with running_plugin(short_dir, source) as plugin:
            target = plugin.make_pod_dirs()
            fields = {k: v for k, v in overrides.items() if v is not None}
            request = _publish_request(target, **fields)
            if "volume_capability" in overrides and overrides["volume_capability"] is None:
                request.ClearField("volume_capability")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await plugin.node.NodePublishVolume(request)
            return info.value.code()

    assert run(main(), timeout=30) == grpc.StatusCode.INVALID_ARGUMENT
    assert Path("/proc/self/mountinfo").read_text().count(str(short_dir)) == mountinfo_before


def test_a_target_outside_the_kubelet_pods_dir_is_refused(short_dir: Path) -> None:
    # Whoever reaches the plugin's socket must not be able to mount over any host path:
    # a plain path elsewhere, a '..' escape, and a symlink inside the pods dir that points out.
    source = _source_with_socket(short_dir)
    outside = short_dir / "etc-like"
    outside.mkdir()

    async def main() -> list[grpc.StatusCode]:
        codes = []
        async with running_plugin(short_dir, source) as plugin:
            (plugin.pods / "escape").symlink_to(outside)
            for target in (
                outside / "mount",
                plugin.pods / POD_UID / ".." / ".." / "etc-like" / "mount",
                plugin.pods / "escape" / "mount",
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await plugin.node.NodePublishVolume(_publish_request(target))
                codes.append(info.value.code())
        return codes

    assert run(main(), timeout=30) == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert not (outside / "mount").exists()


_FETCH = """
import sys
import sysconfig
from spiffe import WorkloadApiClient
try:
    with WorkloadApiClient() as client:
        context = client.fetch_x509_context()
        print(",".join(sorted(str(svid.spiffe_id) for svid in context.x509_svids)))
except Exception as exc:
    print("refused:", type(exc).__name__, exc)
"""


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="no system interpreter")
def test_workload_reaching_the_agent_through_the_published_mount_is_attested_as_itself(
    live_ca: LiveCa, short_dir: Path
) -> None:
    # Two entries: one for the workload's uid (nobody) and one for another uid. The process
    # that dials the socket through the pod's mount gets its own SVID and never the other:
    # the plugin publishes a path, the agent still decides by SO_PEERCRED.
    short_dir.chmod(0o755)
    agent_dir = short_dir / "agent"
    agent_dir.mkdir(mode=0o755)
    entries = [
        entry(selectors=[f"unix:uid:{NOBODY}"]),
        entry(OTHER, selectors=["unix:uid:4242"]),
    ]

    async def main() -> str:
        async with (
            running_agent(make_upstream(live_ca, entries), agent_dir),
            running_plugin(short_dir, agent_dir) as plugin,
        ):
            target = plugin.make_pod_dirs()
            for parent in (plugin.pods, *target.parents[:4]):
                parent.chmod(0o755)
            await plugin.node.NodePublishVolume(_publish_request(target))
            # The container runtime shows the volume at the container's mountPath; a short
            # link stands in for it (the kubelet's path is longer than a Unix socket path may
            # be, and its '~' is not valid in py-spiffe's endpoint URI).
            in_pod = short_dir / "w"
            in_pod.symlink_to(target)
            proc = await asyncio.create_subprocess_exec(
                SYSTEM_PYTHON, "-c", _FETCH,
                user=NOBODY,
                env={
                    "SPIFFE_ENDPOINT_SOCKET": f"unix://{in_pod}/agent.sock",
                    "PYTHONPATH": SITE_PACKAGES,
                    "HOME": "/",
                },
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 40)
            await plugin.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=f"csi-{POD_UID}", target_path=str(target)
                )
            )
            return out.decode().strip() or err.decode()

    assert run(main(), timeout=60) == "spiffe://example.org/ns/default/sa/web"


def _plugin_answers(process: subprocess.Popen[str], csi_socket: Path) -> tuple[str, str]:
    wait_for(lambda: csi_socket.exists() or process.poll() is not None, 30, "the CSI socket")

    async def main() -> tuple[str, str]:
        async with grpc.aio.insecure_channel(f"unix://{csi_socket}") as channel:
            info = await csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(
                csi_pb2.GetPluginInfoRequest()
            )
            node = await csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest())
            return info.name, node.node_id

    return run(main(), timeout=20)


def _stop(process: subprocess.Popen[str]) -> int:
    process.terminate()
    try:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=5)


def test_trellis_agent_csi_serves_the_plugin_alone_and_stops_cleanly_on_sigterm(
    short_dir: Path,
) -> None:
    csi_socket = short_dir / "csi" / "csi.sock"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "trellis", "agent-csi", "--csi-socket", str(csi_socket),
            "--agent-socket-dir", str(_source_with_socket(short_dir)), "--node", "node-b",
            "--csi-pods-dir", str(short_dir / "pods"),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert _plugin_answers(process, csi_socket) == (DRIVER_NAME, "node-b")
    finally:
        code = _stop(process)
    assert code == 0
    assert "Traceback" not in (process.stderr.read() if process.stderr else "")


def test_trellis_agent_with_csi_socket_serves_the_plugin_beside_the_workload_api(
    short_dir: Path,
) -> None:
    # A real `trellis agent` process; its CA is unreachable (port 1), which the plugin does
    # not wait for: the kubelet must be able to mount while the agent is still attesting.
    roots = short_dir / "roots.pem"
    root = RootAuthority.create(TrustDomain("example.org"), now=dt.datetime.now(dt.UTC))
    roots.write_bytes(root.certificate.public_bytes(serialization.Encoding.PEM))
    token = short_dir / "token"
    token.write_text("tjt_x\n")
    csi_socket = short_dir / "csi" / "csi.sock"
    agent = subprocess.Popen(
        [
            sys.executable, "-m", "trellis", "agent", "--ca", "127.0.0.1:1",
            "--trust-bundle", str(roots), "--join-token-file", str(token),
            "--data-dir", str(short_dir / "data"), "--admin", "off", "--node", "node-a",
            "--socket", str(short_dir / "agent" / "agent.sock"),
            "--csi-socket", str(csi_socket), "--csi-pods-dir", str(short_dir / "pods"),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert _plugin_answers(agent, csi_socket) == (DRIVER_NAME, "node-a")
        assert stat.S_IMODE(csi_socket.stat().st_mode) == 0o600  # the kubelet (root) only
    finally:
        _stop(agent)
