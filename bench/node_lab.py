"""One storage VM and one GPU VM with FlashMesh running (agent, node plugin, CSI
controller, sidecars, operator) and a pool over the storage VM's drive; CSI calls made
directly on the controller's socket and the node plugin's TCP endpoint, as the sidecars
and the kubelet would make them. Shared by the attach and data path benchmarks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.common import timed_wait
from flashmesh.core import naming, resources
from flashmesh.core.resources import TOPOLOGY_KEY
from flashmesh.csi_driver._proto import csi_pb2, csi_pb2_grpc
from flashmesh.lab import demo
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.kubelet import NODE_PORT
from flashmesh.lab.vm import Drive, Lab, VmSpec, host_nqn, vm_uuid

API = resources.API_VERSION
POOL = "bench"
STORAGE = VmSpec("storage-0", 1, drives=(Drive(2048),), memory_mib=512)
GPU = VmSpec("gpu-0", 3, memory_mib=512)
LIB = Path(__file__).resolve().parents[1] / "src/flashmesh/lab/guest/lab-lib.sh"
Mode = csi_pb2.VolumeCapability.AccessMode.Mode


def host_args(vm: str) -> str:
    """nvme connect's host NQN and host ID for a VM, the pair its node plugin uses (the
    kernel refuses one host ID under two NQNs)."""
    return f"-q {host_nqn(vm)} -I {vm_uuid(vm)}"


def capability(block: bool) -> csi_pb2.VolumeCapability:
    mode = csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER)
    if block:
        return csi_pb2.VolumeCapability(
            block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=mode
        )
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"), access_mode=mode
    )


@dataclass
class Attached:
    volume: csi_pb2.Volume
    cap: csi_pb2.VolumeCapability
    publish_context: dict[str, str]

    @property
    def staging(self) -> str:
        return f"/run/bench/{self.volume.volume_id}/staging"

    @property
    def target(self) -> str:
        return f"/run/bench/{self.volume.volume_id}/target"


@dataclass
class NodeLab:
    cluster: LocalCluster
    lab: Lab
    controller: Any
    node: Any

    def sh(self, vm: str, script: str, timeout: float = 600) -> str:
        return self.lab.exec(vm, f"set -e\nsource {LIB}\n{script}", timeout=timeout).output

    def fio_json(self, vm: str, args: str, timeout: float = 900) -> dict[str, Any]:
        out = self.sh(vm, f"fio --output-format=json {args}", timeout)
        return dict(json.loads(out[out.index("{") :]))

    def create(self, name: str, size_mib: int, block: bool, width: int = 1) -> Attached:
        """A volume made and published to the GPU VM (not staged yet)."""
        cap = capability(block)
        volume = self.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=name,
                capacity_range=csi_pb2.CapacityRange(required_bytes=size_mib << 20),
                volume_capabilities=[cap],
                parameters={"pool": POOL, "stripeWidth": str(width), "transport": "tcp"},
            ),
            timeout=600,
        ).volume
        published = self.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume.volume_id, node_id=host_nqn(GPU.name), volume_capability=cap,
                volume_context=volume.volume_context,
            ),
            timeout=600,
        )  # fmt: skip
        return Attached(volume, cap, dict(published.publish_context))

    def stage(self, a: Attached) -> float:
        """NodeStageVolume as the kubelet calls it; its seconds, seen by the caller."""
        begin = time.monotonic()
        self.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=a.volume.volume_id, publish_context=a.publish_context,
                staging_target_path=a.staging, volume_capability=a.cap,
                volume_context=a.volume.volume_context,
            ),
            timeout=600,
        )  # fmt: skip
        return time.monotonic() - begin

    def unstage(self, a: Attached) -> None:
        self.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(
                volume_id=a.volume.volume_id, staging_target_path=a.staging
            ),
            timeout=600,
        )

    def publish(self, a: Attached) -> str:
        """NodePublishVolume: the path a pod would see (a device file for block)."""
        self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=a.volume.volume_id, staging_target_path=a.staging,
                target_path=a.target, volume_capability=a.cap,
                volume_context=a.volume.volume_context,
            ),
            timeout=300,
        )  # fmt: skip
        return a.target

    def unpublish(self, a: Attached) -> None:
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=a.volume.volume_id, target_path=a.target),
            timeout=300,
        )

    def segment(self, a: Attached) -> tuple[str, str, str]:
        """The single segment's subsystem NQN, address and port, from the Volume's status."""
        found = self.cluster.kube.get(API, "Volume", a.volume.volume_id) or {}
        seg = ((found.get("status") or {}).get("segments") or [])[0]
        endpoint = next(e for e in seg["endpoints"] if e["transport"] == "tcp")
        return seg["subsystemNQN"], endpoint["address"], str(endpoint["port"])

    def local_device(self, a: Attached) -> str:
        """The segment's logical volume as its storage VM sees it."""
        vg = naming.pool_volume_group(POOL)
        return naming.lv_device(vg, naming.segment_lv(a.volume.volume_id, 0, 0))


@contextmanager
def node_lab(
    workdir: Path, storage: tuple[VmSpec, ...] = (STORAGE,), gpu: VmSpec = GPU
) -> Iterator[NodeLab]:
    """The VMs booted, FlashMesh running, the pool serving on every storage VM."""
    with demo.stack(workdir, storage, (gpu,)) as (cluster, lab), ExitStack() as down:
        demo.start_components(cluster, lab, down, storage, (gpu,))
        kube = cluster.kube
        kube.create({
            "apiVersion": API, "kind": "StoragePool", "metadata": {"name": POOL},
            "spec": {"nodeSelector": {"matchLabels": {"flashmesh.dev/storage": "true"}},
                     "drives": {"pathPatterns": ["/dev/nvme*n1"], "minSize": "900Mi"},
                     "transports": ["tcp"]},
        })  # fmt: skip

        def pool_ready() -> bool:
            found = kube.get(API, "StoragePool", POOL) or {}
            return (found.get("status") or {}).get("nodesReady") == len(storage)

        timed_wait(f"the pool serving on {len(storage)} storage VM(s)", pool_ready, 900)
        # The GPU VM's Node and CSINode, as its kubelet would register them (the lab has no
        # kubelet): ControllerPublish finds the node by its host NQN there.
        driver = {"name": resources.CSI_DRIVER, "nodeID": host_nqn(gpu.name),
                  "topologyKeys": [TOPOLOGY_KEY]}  # fmt: skip
        cluster.add_fake_node(gpu.name, labels={TOPOLOGY_KEY: "default"}, csi_drivers=[driver])
        socket = lab.workdir / "csi-controller.sock"
        controller = csi_pb2_grpc.ControllerStub(grpc.insecure_channel(f"unix://{socket}"))
        node = csi_pb2_grpc.NodeStub(grpc.insecure_channel(f"{gpu.address(0)}:{NODE_PORT}"))

        def node_serving() -> bool:
            try:
                node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=5)
            except grpc.RpcError:
                return False
            return True

        timed_wait(f"the node plugin in {gpu.name} serving", node_serving, 300)
        yield NodeLab(cluster, lab, controller, node)
