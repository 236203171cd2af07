"""FlashMesh's CSI driver under the real Kubernetes machinery: csi-provisioner,
csi-attacher, csi-resizer, csi-snapshotter and snapshot-controller against the real API
server and the controller's socket; the agents in the storage VMs serve what they ask for.

A pod on a KWOK node named after the GPU-1 VM gets its volume: provisioned (PVC Bound),
attached (the VolumeAttachment, and GPU-1's host NQN allowed in the storage VMs' configfs).
The lab has no kubelet, so this test makes the node calls a kubelet would make, on GPU-1's
node plugin, and writes and reads data through them. Then: detach cuts GPU-1 off, a bigger
PVC grows the logical volumes, a VolumeSnapshot becomes ready, a PVC restored from it holds
the data, and deleting everything leaves no export and no logical volume."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from agents import NODES, POOL, agent_log, exported, logical_volumes
from csi import controller, controller_log, node_log, node_stub, start_node_plugin, stop_node_plugin
from helpers import GPU1, MIB, Scenario, sh

from flashmesh.core import naming, resources
from flashmesh.csi_driver._proto import csi_pb2
from flashmesh.csi_driver.controller import TOPOLOGY_KEY
from flashmesh.kube import Kube
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.sidecars import Sidecars
from flashmesh.lab.vm import Lab, host_nqn

pytestmark = [pytest.mark.kernel, pytest.mark.second_lab]

VM = GPU1.name
NS = "default"
SC = "flashmesh-agents"
NVMET = "/sys/kernel/config/nvmet/subsystems"


@dataclass
class Stack:
    kube: Kube
    sidecars: Sidecars
    node: Any


@pytest.fixture(scope="module")
def stack(
    lab: Lab, agents: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    socket = tmp_path_factory.mktemp("csi") / "controller.sock"
    kube = agents.kube
    with controller(lab, agents, str(socket)):
        agents.add_fake_node(
            VM,
            labels={TOPOLOGY_KEY: "default"},
            gpus=1,
            csi_drivers=[
                {
                    "name": resources.CSI_DRIVER,
                    "nodeID": host_nqn(VM),
                    "topologyKeys": [TOPOLOGY_KEY],
                }
            ],
        )
        start_node_plugin(lab, agents, VM)
        sidecars = Sidecars(agents, socket, lab.workdir / "sidecars")
        sidecars.start()
        kube.create(
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {"name": SC},
                "provisioner": resources.CSI_DRIVER,
                "parameters": {"pool": POOL, "stripeWidth": "2"},
                "volumeBindingMode": "WaitForFirstConsumer",
                "allowVolumeExpansion": True,
                "reclaimPolicy": "Delete",
            }
        )
        kube.create(
            {
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshotClass",
                "metadata": {"name": SC},
                "driver": resources.CSI_DRIVER,
                "deletionPolicy": "Delete",
            }
        )
        try:
            yield Stack(kube, sidecars, node_stub(GPU1.address(0)))
        finally:
            sidecars.stop()
            stop_node_plugin(lab, VM)


def pvc(name: str, size: str, source: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": SC,
        "resources": {"requests": {"storage": size}},
    }
    if source:
        spec["dataSource"] = {
            "apiGroup": "snapshot.storage.k8s.io",
            "kind": "VolumeSnapshot",
            "name": source,
        }
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def pod(name: str, claim: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": VM},
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


def bound_pv(kube: Kube, claim: str) -> dict[str, Any] | None:
    found = kube.get("v1", "PersistentVolumeClaim", claim, NS) or {}
    if (found.get("status") or {}).get("phase") != "Bound":
        return None
    return kube.get("v1", "PersistentVolume", found["spec"]["volumeName"])


def attachment(kube: Kube, pv: str) -> dict[str, Any] | None:
    for va in kube.list("storage.k8s.io/v1", "VolumeAttachment"):
        if va["spec"]["source"].get("persistentVolumeName") == pv:
            return va
    return None


def allowed_everywhere(lab: Lab, vid: str, host: str) -> list[bool]:
    out = []
    for i, spec in enumerate(NODES):
        listing = sh(
            lab,
            spec.name,
            f"ls {NVMET}/{naming.subsystem_nqn(vid, i, 0)}/allowed_hosts 2>/dev/null || true",
        )
        out.append(host in listing.split())
    return out


def wait(what: str, condition: Any, stack: Stack, lab: Lab, timeout: float = 300) -> None:
    if processes.wait_until(condition, timeout, interval=1.0):
        return
    logs = "\n".join(
        f"--- {n} ---\n{stack.sidecars.log(n, 1500)}"
        for n in (
            "csi-provisioner",
            "csi-attacher",
            "csi-resizer",
            "csi-snapshotter",
            "snapshot-controller",
        )
    )
    raise AssertionError(
        f"{what}\n{logs}\n--- controller ---\n{controller_log(lab)}\n"
        f"--- node ---\n{node_log(lab, VM)}\n{agent_log(lab, NODES[0].name)}"
    )


def mounted(stack: Stack, pv: dict[str, Any], va: dict[str, Any], pod_name: str) -> str:
    """Stages and publishes the volume on GPU-1 as its kubelet would; the pod's path."""
    csi = pv["spec"]["csi"]
    cap = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )
    staging = f"/run/kubelet/plugins/{pv['metadata']['name']}/globalmount"
    target = f"/run/kubelet/pods/{pod_name}/volumes/data"
    context = dict(csi.get("volumeAttributes") or {})
    publish = dict(va["status"].get("attachmentMetadata") or {})
    stack.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=csi["volumeHandle"],
            publish_context=publish,
            staging_target_path=staging,
            volume_capability=cap,
            volume_context=context,
        ),
        timeout=600,
    )
    stack.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=csi["volumeHandle"],
            publish_context=publish,
            staging_target_path=staging,
            target_path=target,
            volume_capability=cap,
            volume_context=context,
        ),
        timeout=120,
    )
    return target


def unmounted(stack: Stack, pv: dict[str, Any], pod_name: str) -> None:
    vid = pv["spec"]["csi"]["volumeHandle"]
    stack.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=f"/run/kubelet/pods/{pod_name}/volumes/data"
        ),
        timeout=120,
    )
    stack.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid,
            staging_target_path=f"/run/kubelet/plugins/{pv['metadata']['name']}/globalmount",
        ),
        timeout=300,
    )


def test_a_pvc_through_the_sidecars_attach_grow_snapshot_restore_delete(
    lab: Lab, stack: Stack, scenario: Scenario
) -> None:
    kube, gpu = stack.kube, host_nqn(VM)
    begin = time.monotonic()
    kube.create(pvc("dataset", "64Mi"))
    kube.create(pod("etl", "dataset"))
    wait("PVC dataset Bound", lambda: bound_pv(kube, "dataset") is not None, stack, lab)
    pv = bound_pv(kube, "dataset")
    assert pv is not None
    vid = pv["spec"]["csi"]["volumeHandle"]
    assert pv["spec"]["csi"]["volumeAttributes"]["stripeWidth"] == "2"
    wait(
        "attached",
        lambda: (
            ((attachment(kube, pv["metadata"]["name"]) or {}).get("status") or {}).get("attached")
            is True
        ),
        stack,
        lab,
    )
    assert allowed_everywhere(lab, vid, gpu) == [True, True]
    va = attachment(kube, pv["metadata"]["name"])
    assert va is not None and "segments" in va["status"]["attachmentMetadata"]

    path = mounted(stack, pv, va, "etl")
    written = sh(
        lab,
        VM,
        f"head -c 4M /dev/urandom > {path}/data && sync && sha256sum < {path}/data | cut -d' ' -f1",
    ).strip()
    unmounted(stack, pv, "etl")
    kube.delete("v1", "Pod", "etl", NS)
    wait("detached", lambda: attachment(kube, pv["metadata"]["name"]) is None, stack, lab)
    assert allowed_everywhere(lab, vid, gpu) == [False, False]

    # Growing the PVC grows every segment's logical volume.
    claim = kube.get("v1", "PersistentVolumeClaim", "dataset", NS) or {}
    claim["spec"]["resources"]["requests"]["storage"] = "128Mi"
    kube.replace(claim)
    lv = [naming.segment_lv(vid, i, 0) for i in range(2)]
    wait(
        "logical volumes grown",
        lambda: (
            [logical_volumes(lab, n.name).get(name) for n, name in zip(NODES, lv, strict=True)]
            == [64 * MIB] * 2
        ),
        stack,
        lab,
    )

    # A snapshot, ready; a PVC restored from it holds the data written before.
    kube.create(
        {
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": "dataset-snap", "namespace": NS},
            "spec": {
                "volumeSnapshotClassName": SC,
                "source": {"persistentVolumeClaimName": "dataset"},
            },
        }
    )

    def snapshot_ready() -> bool:
        snap = kube.get("snapshot.storage.k8s.io/v1", "VolumeSnapshot", "dataset-snap", NS) or {}
        return bool((snap.get("status") or {}).get("readyToUse"))

    wait("VolumeSnapshot ready", snapshot_ready, stack, lab)
    kube.create(pvc("restored", "128Mi", source="dataset-snap"))
    kube.create(pod("train", "restored"))
    wait("PVC restored Bound", lambda: bound_pv(kube, "restored") is not None, stack, lab)
    restored = bound_pv(kube, "restored")
    assert restored is not None
    rid = restored["spec"]["csi"]["volumeHandle"]
    wait(
        "restored attached",
        lambda: (
            ((attachment(kube, restored["metadata"]["name"]) or {}).get("status") or {}).get(
                "attached"
            )
            is True
        ),
        stack,
        lab,
    )
    va = attachment(kube, restored["metadata"]["name"])
    assert va is not None
    path = mounted(stack, restored, va, "train")
    read = sh(lab, VM, f"sha256sum < {path}/data | cut -d' ' -f1").strip()
    size = int(sh(lab, VM, f"df -B1 --output=size {path} | tail -1").strip())
    assert read == written
    assert size > 96 * MIB  # the filesystem was grown to the restored volume's size
    unmounted(stack, restored, "train")

    # Deleting pods, PVCs and the snapshot leaves no export and no logical volume.
    kube.delete("v1", "Pod", "train", NS)
    wait(
        "restored detached",
        lambda: attachment(kube, restored["metadata"]["name"]) is None,
        stack,
        lab,
    )
    kube.delete("snapshot.storage.k8s.io/v1", "VolumeSnapshot", "dataset-snap", NS)
    for claim_name in ("restored", "dataset"):
        kube.delete("v1", "PersistentVolumeClaim", claim_name, NS)
    gone = [vid, rid]
    wait(
        "Volumes deleted",
        lambda: all(kube.get(resources.API_VERSION, "Volume", v) is None for v in gone),
        stack,
        lab,
    )
    wait(
        "Snapshots deleted",
        lambda: not [s for s in kube.list(resources.API_VERSION, "Snapshot")
                     if s["spec"]["sourceVolume"] in gone],
        stack,
        lab,
    )  # fmt: skip
    for spec in NODES:
        subsystems, links = exported(lab, spec.name)
        assert not any(v in " ".join(subsystems + links) for v in gone)
        assert list(logical_volumes(lab, spec.name)) == ["thin"]
    scenario.done(
        "PVC Bound via csi-provisioner, attached via csi-attacher (host NQN allowed on both "
        "storage VMs), data written through the node plugin, detach cut the host off, grown "
        "via csi-resizer, VolumeSnapshot ready, restored PVC read the data back, deletion left "
        f"nothing ({time.monotonic() - begin:.0f} s)"
    )
