"""Which volume capabilities FlashMesh serves: single-node access of every kind; many
readers for mount and block; many writers for raw block only (no filesystem FlashMesh
mounts is safe with two writers)."""

from __future__ import annotations

from flashmesh.csi_driver._proto import csi_pb2
from flashmesh.csi_driver.errors import invalid

Mode = csi_pb2.VolumeCapability.AccessMode
FILESYSTEMS = ("ext4", "xfs")
DEFAULT_FS = "ext4"
SINGLE_NODE = frozenset({
    Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
    Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER,
})  # fmt: skip
READ_ONLY = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})
# publish_context key: ControllerPublish was asked for read-only (the CO's readonly flag),
# which NodeStage enforces on the device itself.
READONLY_CONTEXT = "readonly"
# publish_context key: the volume was published as a block device before (or copied from
# one that was), so NodeStage may mount a filesystem found on it but never make one.
NO_FORMAT_CONTEXT = "noFormat"


def problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why a capability is not served, or None when it is."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "volume_capability needs an access type: block or mount"
    mode = cap.access_mode.mode
    if mode == Mode.UNKNOWN:
        return "volume_capability.access_mode.mode is missing"
    if mode == Mode.MULTI_NODE_SINGLE_WRITER:
        return "access mode MULTI_NODE_SINGLE_WRITER is not supported: use a single-node mode"
    if mode == Mode.MULTI_NODE_MULTI_WRITER and kind == "mount":
        return (
            "access mode MULTI_NODE_MULTI_WRITER is served for block volumes only: "
            "a filesystem mounted on two nodes would be corrupted"
        )
    if kind == "mount" and cap.mount.fs_type and cap.mount.fs_type not in FILESYSTEMS:
        return f"fs_type {cap.mount.fs_type!r} is not supported: use ext4 or xfs"
    return None


def mirror_problem(cap: csi_pb2.VolumeCapability, replicas: int) -> str | None:
    """Why a capability cannot be served by a volume with this many replicas: md RAID1
    runs on the one node that assembles it, so a mirror is attached to one node at a time
    (a second node assembling it would write its legs behind the first one's back)."""
    mode = cap.access_mode.mode
    if replicas > 1 and mode not in SINGLE_NODE:
        return (
            f"a mirrored volume (replicas: {replicas}) is attached to one node at a time, so "
            f"{Mode.Mode.Name(mode)} cannot be served: use a single-node access mode, or "
            'replicas: "1"'
        )
    return None


def check(caps: list[csi_pb2.VolumeCapability], field: str = "volume_capabilities") -> None:
    """INVALID_ARGUMENT naming the field unless every capability is served."""
    if not caps:
        raise invalid(f"{field} is missing: give at least one volume capability")
    for cap in caps:
        why = problem(cap)
        if why:
            raise invalid(f"{field}: {why}")


def fs_type(cap: csi_pb2.VolumeCapability) -> str:
    return cap.mount.fs_type or DEFAULT_FS
