"""Every name FlashMesh gives derives from a short id, and the id from the CSI name, so each
step is idempotent and a restarted component finds what it already made.

CSI names can be 128 bytes with upper case; Kubernetes object names (253, lower case),
LVM names (127), device-mapper and md names (32) and NVMe serials (20) are shorter, so the
id is a hash: `fm-` and 12 hex digits for a volume, `fs-` for a snapshot.
"""

from __future__ import annotations

import hashlib
import uuid

NQN_PREFIX = "nqn.2026-11.dev.flashmesh:"
VOLUME_PREFIX = "fm-"
SNAPSHOT_PREFIX = "fs-"
_ID_HEX = 12
_UUID_NAMESPACE = uuid.UUID("0f1c2a7e-5b9d-4c3e-8a61-6d2f4b8e9c05")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def volume_id(csi_name: str) -> str:
    """The volume id (and Volume object name) of a CSI volume name."""
    if not csi_name:
        raise ValueError("a CSI volume name must not be empty")
    return VOLUME_PREFIX + _digest(csi_name)[:_ID_HEX]


def snapshot_id(csi_name: str) -> str:
    if not csi_name:
        raise ValueError("a CSI snapshot name must not be empty")
    return SNAPSHOT_PREFIX + _digest(csi_name)[:_ID_HEX]


def segment_name(index: int, replica: int) -> str:
    return f"s{index}r{replica}"


def segment_lv(volume: str, index: int, replica: int) -> str:
    """The logical volume of a segment (also a snapshot's thin volume, from its id)."""
    return f"{volume}-{segment_name(index, replica)}"


def lv_device(volume_group: str, lv: str) -> str:
    """A logical volume's device-mapper node, which needs no udev-made /dev/<vg>/<lv> link
    (device-mapper doubles the dashes inside each name)."""
    return f"/dev/mapper/{volume_group.replace('-', '--')}-{lv.replace('-', '--')}"


def pool_volume_group(pool: str) -> str:
    """The volume group a storage node keeps for a StoragePool."""
    return f"flashmesh-{pool}"


def subsystem_nqn(volume: str, index: int, replica: int) -> str:
    return f"{NQN_PREFIX}{volume}.{segment_name(index, replica)}"


def is_flashmesh_nqn(nqn: str) -> bool:
    return nqn.startswith(NQN_PREFIX)


def subsystem_serial(volume: str, index: int, replica: int) -> str:
    """At most 20 characters, as NVMe allows."""
    serial = volume.replace("-", "") + segment_name(index, replica)
    if len(serial) > 20:
        raise ValueError(f"serial {serial!r} is longer than 20 characters")
    return serial


def namespace_uuid(nqn: str) -> str:
    """device_uuid of a segment's namespace: stable, so a host keeps its device across a
    target restart."""
    return str(uuid.uuid5(_UUID_NAMESPACE, nqn))


def namespace_nguid(nqn: str) -> str:
    """device_nguid (16 bytes, written in nvmet's UUID-like form)."""
    return str(uuid.UUID(hex=_digest("nguid:" + nqn)[:32]))


def host_nqn(node_identity: str) -> str:
    """A node's NVMe host NQN from a stable identity of the node, never from an
    /etc/nvme/hostnqn that cloned images share. An SMBIOS UUID is used as it is (as
    `nvme gen-hostnqn` does); any other identity is hashed into a UUID."""
    try:
        node_uuid = uuid.UUID(node_identity.strip())
    except ValueError:
        node_uuid = uuid.uuid5(_UUID_NAMESPACE, node_identity)
    return f"nqn.2014-08.org.nvmexpress:uuid:{node_uuid}"


def node_lease(node: str) -> str:
    """The coordination Lease a storage node's agent renews as its heartbeat."""
    return f"flashmesh-agent-{node}"


# Volumes and Snapshots carry one label per storage node holding one of their segments, so
# an agent watches only its own with a selector the API server evaluates.
NODE_LABEL_PREFIX = "nodes.flashmesh.dev/"
_LABEL_NAME_MAX = 63


def node_label(node: str) -> str:
    """The label key that marks an object as having a segment on `node`. A node name is a
    DNS subdomain (up to 253 characters); a label name is at most 63, so a longer one is
    hashed."""
    if len(node) <= _LABEL_NAME_MAX:
        return NODE_LABEL_PREFIX + node
    return NODE_LABEL_PREFIX + "h-" + _digest(node)[:40]


def node_labels(nodes: list[str]) -> dict[str, str]:
    """The labels an object with segments on these nodes carries."""
    return {node_label(n): "true" for n in sorted(set(nodes))}
