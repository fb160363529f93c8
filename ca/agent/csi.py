"""A minimal CSI node plugin that publishes the agent's Workload API socket into pods.

Why: Pod Security "baseline" forbids ``hostPath`` volumes, and the Workload API is a Unix
socket on the node. The SPIFFE CSI driver's answer, taken here: the agent's DaemonSet runs
a CSI node plugin, and a pod asks for the socket directory as a CSI *ephemeral* inline
volume (``csi: {driver: csi.trellis.dev, readOnly: true}``), which baseline allows. The
kubelet calls ``NodePublishVolume`` and the plugin bind-mounts the socket directory,
read-only, at the pod's target path.

Security: the plugin hands out no identity. It only makes the socket reachable; the agent
still attests every caller by ``SO_PEERCRED`` on that socket (``peercred.py``,
``attestation.py``), so a pod reaching the socket through its mount gets the SVIDs of its
own processes and nothing else -- exactly as with the hostPath before. The volume carries
no per-pod data, which is why an ephemeral volume with no attributes is enough.

Only the node half of the CSI spec (v1.11, csi.v1) is served: Identity (GetPluginInfo,
GetPluginCapabilities, Probe) and Node (NodePublishVolume, NodeUnpublishVolume,
NodeGetInfo, NodeGetCapabilities). There is no controller: nothing is provisioned.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

from ca.agent._csi_proto import csi_pb2

__all__ = ["DRIVER_NAME", "CsiConfig", "CsiNodePlugin", "start_csi_server"]

DRIVER_NAME = "csi.trellis.dev"
VERSION = "0.1.0"
DEFAULT_PODS_DIR = "/var/lib/kubelet/pods"

_log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# <sys/mount.h>
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MNT_DETACH = 2

# The process's own symbols include libc's mount(2)/umount2(2); find_library would spawn ldconfig.
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class CsiConfig:
    """What the plugin publishes, where it may publish it, and the node's name."""

    source_dir: Path  # the directory holding the agent's Workload API socket
    node_id: str
    pods_dir: Path = Path(DEFAULT_PODS_DIR)  # the kubelet's; targets must lie under it


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _umount(target: str) -> None:
    if _libc.umount2(target.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # EINVAL: not a mount point (already unpublished)
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _is_mount_point(path: Path) -> bool:
    """Whether ``path`` is a mount point, by the kernel's table.

    ``os.path.ismount`` compares device numbers, and a bind mount from the same filesystem
    has the parent's device: it would call a published target unmounted and mount again.
    """
    wanted = str(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        # proc(5): field 5 is the mount point, with space, tab, newline, backslash as \ooo.
        if len(fields) > 4 and _unescape(fields[4]) == wanted:
            return True
    return False


def _unescape(field: str) -> str:
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def _target_under(pods_dir: Path, raw: str) -> Path:
    """The target path, refused unless it lies inside the kubelet's pods directory.

    The kubelet is the only legitimate caller and always names a path under its pods
    directory; anything else (``/etc``, a ``..`` escape, a symlink out) would let whoever
    reaches this socket mount over an arbitrary host path.
    """
    if not raw or not raw.startswith("/"):
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "target_path must be an absolute path")
    target = Path(raw)
    if ".." in target.parts:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "target_path must not contain '..'")
    parent = target.parent.resolve()
    root = pods_dir.resolve()
    if parent != root and root not in parent.parents:
        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"target_path must lie under {pods_dir}")
    return parent / target.name


class CsiNodePlugin:
    """The Identity and Node services of csi.v1, over the agent's socket directory."""

    def __init__(self, config: CsiConfig) -> None:
        self._config = config

    # -- Identity -------------------------------------------------------------------
    async def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: Context
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=VERSION)

    async def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: Context
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        # No CONTROLLER_SERVICE: nothing is provisioned or attached.
        return csi_pb2.GetPluginCapabilitiesResponse()

    async def Probe(self, request: csi_pb2.ProbeRequest, context: Context) -> csi_pb2.ProbeResponse:
        ready = self._config.source_dir.is_dir()
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))

    # -- Node -----------------------------------------------------------------------
    async def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: Context
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self._config.node_id)

    async def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        # No STAGE_UNSTAGE_VOLUME: the kubelet calls NodePublishVolume directly.
        return csi_pb2.NodeGetCapabilitiesResponse()

    async def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: Context
    ) -> csi_pb2.NodePublishVolumeResponse:
        try:
            self._publish(request)
        except _Refused as refused:
            await context.abort(refused.code, refused.message)
        except OSError as exc:
            _log.warning("NodePublishVolume %s: %s", request.target_path, exc)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        return csi_pb2.NodePublishVolumeResponse()

    async def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: Context
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        try:
            if not request.volume_id:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "volume_id is required")
            target = _target_under(self._config.pods_dir, request.target_path)
            # CSI spec: Unpublish of an already unpublished target succeeds (idempotent).
            if target.exists():
                # Bounded: a target holds one mount of ours; a few more would be stacked by
                # something else, and are left for the kubelet to report.
                for _ in range(4):
                    if not _is_mount_point(target):
                        break
                    _umount(str(target))
                target.rmdir()
        except _Refused as refused:
            await context.abort(refused.code, refused.message)
        except OSError as exc:
            _log.warning("NodeUnpublishVolume %s: %s", request.target_path, exc)
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        return csi_pb2.NodeUnpublishVolumeResponse()

    def generic_handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        """The two services, registered by name (the generated ``*_pb2_grpc`` is untyped)."""

        def unary(
            method: Callable[[Any, Context], Awaitable[Any]], request_type: Any
        ) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=request_type.FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )

        identity = {
            "GetPluginInfo": unary(self.GetPluginInfo, csi_pb2.GetPluginInfoRequest),
            "GetPluginCapabilities": unary(
                self.GetPluginCapabilities, csi_pb2.GetPluginCapabilitiesRequest
            ),
            "Probe": unary(self.Probe, csi_pb2.ProbeRequest),
        }
        node = {
            "NodeGetInfo": unary(self.NodeGetInfo, csi_pb2.NodeGetInfoRequest),
            "NodeGetCapabilities": unary(
                self.NodeGetCapabilities, csi_pb2.NodeGetCapabilitiesRequest
            ),
            "NodePublishVolume": unary(self.NodePublishVolume, csi_pb2.NodePublishVolumeRequest),
            "NodeUnpublishVolume": unary(
                self.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest
            ),
        }
        return (
            grpc.method_handlers_generic_handler("csi.v1.Identity", identity),
            grpc.method_handlers_generic_handler("csi.v1.Node", node),
        )

    def _publish(self, request: csi_pb2.NodePublishVolumeRequest) -> None:
        if not request.volume_id:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "volume_id is required")
        if not request.HasField("volume_capability") or not request.volume_capability.HasField(
            "mount"
        ):
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, "volume_capability must be a mount volume"
            )
        if not request.readonly:
            # The socket directory is the agent's; a pod may use the socket, never write there.
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "the volume must be readOnly")
        target = _target_under(self._config.pods_dir, request.target_path)
        if target.is_dir() and _is_mount_point(target):
            return  # CSI spec: a repeated Publish of the same volume succeeds.
        target.mkdir(mode=0o755, parents=False, exist_ok=True)
        _mount(str(self._config.source_dir), str(target), _MS_BIND)
        # A bind mount ignores MS_RDONLY on creation; the read-only remount applies it.
        flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        try:
            _mount("none", str(target), flags)
        except OSError:
            _umount(str(target))
            raise


async def start_csi_server(config: CsiConfig, socket_path: Path) -> grpc.aio.Server:
    """Serve the plugin on ``socket_path`` (the one node-driver-registrar registers)."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(CsiNodePlugin(config).generic_handlers())
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    # Only root (the kubelet) may talk to the plugin: it mounts on the host.
    socket_path.chmod(0o600)
    return server
