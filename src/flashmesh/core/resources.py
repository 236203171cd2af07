"""Typed models of FlashMesh's custom resources (flashmesh.dev/v1alpha1).

They mirror crds/*.yaml field for field (tests/test_resources_schema.py keeps the two in
step), and their defaults are the schemas' defaults, so a model built from what the API
server returns writes back the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from flashmesh.core import serde

GROUP = "flashmesh.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# The CSI driver's name: CSINode entries under it carry each node's host NQN as node id.
CSI_DRIVER = f"csi.{GROUP}"
# The topology key of the NVMe-oF fabric a node reaches (NodeGetInfo, volumes' topology).
TOPOLOGY_KEY = f"topology.{GROUP}/fabric"


# --- shared shapes ----------------------------------------------------------------------


@dataclass
class Meta:
    """The parts of metav1.ObjectMeta that FlashMesh reads or writes."""

    name: str
    namespace: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    finalizers: list[str] | None = None


@dataclass
class Condition:
    """Shaped like metav1.Condition."""

    type: str
    status: str
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


@dataclass
class LabelSelectorRequirement:
    key: str
    operator: str
    values: list[str] | None = None


@dataclass
class LabelSelector:
    match_labels: dict[str, str] | None = None
    match_expressions: list[LabelSelectorRequirement] | None = None


@dataclass
class Layout:
    """A volume is replicas x stripeWidth segments."""

    stripe_width: int = 1
    replicas: int = 1


@dataclass
class Endpoint:
    """Where a storage node serves NVMe-oF on one transport."""

    transport: str
    address: str
    port: int


@dataclass
class Resource:
    """Common to the five kinds: apiVersion, kind and metadata around spec and status."""

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    NAMESPACED: ClassVar[bool] = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if data.get("kind") not in (None, cls.KIND):
            raise serde.SchemaError(f"kind: expected {cls.KIND}, got {data.get('kind')}")
        return serde.from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": self.KIND, **serde.to_dict(self)}


# --- StoragePool ------------------------------------------------------------------------


@dataclass
class DriveSelector:
    """Which of a selected node's drives join the pool."""

    # udev's stable names: the same drives whatever order the controllers are found in.
    path_patterns: list[str] = field(default_factory=lambda: ["/dev/disk/by-id/nvme-*"])
    min_size: str = "1Gi"


@dataclass
class PoolSecurity:
    dhchap: bool = False


@dataclass
class StoragePoolSpec:
    node_selector: LabelSelector
    drives: DriveSelector = field(default_factory=DriveSelector)
    transports: list[str] = field(default_factory=lambda: ["rdma", "tcp"])
    layout: Layout = field(default_factory=Layout)
    default_volume_size: str = "10Gi"
    security: PoolSecurity = field(default_factory=PoolSecurity)


@dataclass
class StoragePoolStatus:
    phase: str | None = None
    nodes_total: int | None = None
    nodes_ready: int | None = None
    nodes: list[str] | None = None
    capacity: str | None = None
    used: str | None = None
    free: str | None = None
    storage_class_name: str | None = None
    conditions: list[Condition] | None = None
    observed_generation: int | None = None


@dataclass
class StoragePool(Resource):
    KIND: ClassVar[str] = "StoragePool"
    PLURAL: ClassVar[str] = "storagepools"

    metadata: Meta
    spec: StoragePoolSpec
    status: StoragePoolStatus | None = None


# --- StorageNode ------------------------------------------------------------------------


@dataclass
class StorageNodeSpec:
    pool: str | None = None
    # The address the node serves NVMe-oF on, where it is not the agent's --address (the
    # chart gives status.hostIP, the management network on a multi-homed node).
    fabric_address: str | None = None


@dataclass
class Drive:
    path: str
    size: str
    model: str | None = None
    serial: str | None = None
    selected: bool = False


@dataclass
class ThinPool:
    name: str
    size: str
    data_percent: float | None = None
    metadata_percent: float | None = None


@dataclass
class VolumeGroup:
    name: str
    size: str
    free: str
    thin_pool: ThinPool | None = None


@dataclass
class RdmaDevice:
    name: str
    port: int
    state: str
    link_layer: str
    netdev: str | None = None
    gid: str | None = None


@dataclass
class StorageNodeStatus:
    phase: str | None = None
    host_nqn: str | None = field(default=None, metadata=serde.json_key("hostNQN"))
    drives: list[Drive] | None = None
    volume_group: VolumeGroup | None = None
    endpoints: list[Endpoint] | None = None
    rdma_devices: list[RdmaDevice] | None = None
    last_heartbeat_time: str | None = None
    conditions: list[Condition] | None = None
    observed_generation: int | None = None


@dataclass
class StorageNode(Resource):
    KIND: ClassVar[str] = "StorageNode"
    PLURAL: ClassVar[str] = "storagenodes"

    metadata: Meta
    spec: StorageNodeSpec = field(default_factory=StorageNodeSpec)
    status: StorageNodeStatus | None = None


# --- Volume -----------------------------------------------------------------------------


@dataclass
class Segment:
    """One logical volume on one storage node; (index, replica) is its identity."""

    index: int
    replica: int
    node: str
    size: str
    # Raised by a rebuild, the only way a segment moves to another node.
    rebuild: int = 0


@dataclass
class VolumeSource:
    snapshot: str | None = None
    volume: str | None = None


@dataclass
class VolumeSpec:
    csi_name: str
    pool: str
    size: str
    layout: Layout = field(default_factory=Layout)
    segments: list[Segment] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    source: VolumeSource | None = None
    access_type: str | None = None  # Block or Filesystem, as CreateVolume was asked


@dataclass
class SegmentStatus:
    index: int
    replica: int
    node: str
    ready: bool = False
    subsystem_nqn: str | None = field(default=None, metadata=serde.json_key("subsystemNQN"))
    endpoints: list[Endpoint] | None = None
    hosts: list[str] | None = None
    # Removed hosts whose live controllers are not known to be ended yet.
    cutting_off: list[str] | None = None
    # Hosts refused new connections whose live controllers are kept.
    kept_hosts: list[str] | None = None
    message: str | None = None
    size: str | None = None


@dataclass
class ReplicaStatus:
    """A mirrored stripe member as the node plugin holding the array last saw it."""

    index: int
    replica: int
    in_sync: bool
    state: str | None = None
    message: str | None = None
    events: int | None = None  # md's event count at the last membership change
    generation: int | None = None  # raised on every membership change


@dataclass
class VolumeStatus:
    phase: str | None = None
    segments: list[SegmentStatus] | None = None
    replicas: list[ReplicaStatus] | None = None
    conditions: list[Condition] | None = None
    observed_generation: int | None = None


@dataclass
class Volume(Resource):
    KIND: ClassVar[str] = "Volume"
    PLURAL: ClassVar[str] = "volumes"

    metadata: Meta
    spec: VolumeSpec
    status: VolumeStatus | None = None


# --- Snapshot ---------------------------------------------------------------------------


@dataclass
class SnapshotSegment:
    index: int
    replica: int
    node: str
    thin_volume: str


@dataclass
class SnapshotSpec:
    csi_name: str
    source_volume: str
    size: str
    segments: list[SnapshotSegment] = field(default_factory=list)


@dataclass
class SnapshotSegmentStatus:
    index: int
    replica: int
    node: str
    ready: bool = False
    message: str | None = None


@dataclass
class SnapshotStatus:
    ready_to_use: bool = False
    creation_time: str | None = None
    segments: list[SnapshotSegmentStatus] | None = None
    conditions: list[Condition] | None = None
    observed_generation: int | None = None


@dataclass
class Snapshot(Resource):
    KIND: ClassVar[str] = "Snapshot"
    PLURAL: ClassVar[str] = "snapshots"

    metadata: Meta
    spec: SnapshotSpec
    status: SnapshotStatus | None = None


# --- TrainingWorkload -------------------------------------------------------------------


@dataclass
class Dataset:
    size: str
    pool: str


@dataclass
class Toleration:
    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = None


@dataclass
class Stage:
    image: str
    command: list[str]
    args: list[str] | None = None
    replicas: int = 1
    gpus_per_replica: int = 0
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = None


@dataclass
class TrainingStage(Stage):
    checkpoint_size: str = "1Gi"


@dataclass
class Stages:
    etl: Stage
    training: TrainingStage
    inference: Stage | None = None


@dataclass
class TrainingWorkloadSpec:
    dataset: Dataset
    stages: Stages


@dataclass
class WorkloadVolumes:
    dataset: str | None = None
    dataset_snapshot: str | None = None
    dataset_read_only: str | None = None
    checkpoint_snapshot: str | None = None
    model: str | None = None


@dataclass
class StageStatus:
    state: str | None = None
    start_time: str | None = None
    completion_time: str | None = None


@dataclass
class StageStatuses:
    etl: StageStatus | None = None
    training: StageStatus | None = None
    inference: StageStatus | None = None


@dataclass
class TrainingWorkloadStatus:
    phase: str | None = None
    volumes: WorkloadVolumes | None = None
    stages: StageStatuses | None = None
    conditions: list[Condition] | None = None
    observed_generation: int | None = None


@dataclass
class TrainingWorkload(Resource):
    KIND: ClassVar[str] = "TrainingWorkload"
    PLURAL: ClassVar[str] = "trainingworkloads"
    NAMESPACED: ClassVar[bool] = True

    metadata: Meta
    spec: TrainingWorkloadSpec
    status: TrainingWorkloadStatus | None = None


KINDS: tuple[type[Resource], ...] = (StoragePool, StorageNode, Volume, Snapshot, TrainingWorkload)
