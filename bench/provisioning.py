"""Provisioning: 100 PVCs created at once, on FlashMesh and on a CSI driver that does no
storage work, through the same upstream csi-provisioner on the same control plane.

FlashMesh's side is the whole path: the CSI controller places each volume, the storage
agents in two VMs carve a thin logical volume and export it over NVMe/TCP, and only then
is the PVC Bound. The baseline is csi-test's mock driver (csi-driver-host-path, the usual
reference, is not served by the module proxy here; the mock driver answers CreateVolume
from memory, so it measures the Kubernetes machinery alone). Both classes bind at once
(Immediate), so no pod is needed."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.common import lab_pool, timed_wait
from bench.report import Result, percentile
from flashmesh.core import resources
from flashmesh.csi_driver.controller import TOPOLOGY_KEY
from flashmesh.kube import Kube
from flashmesh.lab import demo, processes
from flashmesh.lab.binaries import ensure_mock_driver, locate_csi
from flashmesh.lab.progress import say
from flashmesh.lab.vm import Drive, VmSpec

API = resources.API_VERSION
CLAIMS = 100
SIZE = "16Mi"
POOL = "bench"
MOCK = "io.kubernetes.storage.mock"
STORAGE = tuple(
    VmSpec(f"storage-{i}", 1 + i, drives=(Drive(2048),), memory_mib=512) for i in range(2)
)


def storage_class(name: str, provisioner: str, parameters: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
        "provisioner": provisioner, "parameters": parameters, "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }  # fmt: skip


def claim(name: str, namespace: str, storage_class_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": storage_class_name,
                 "resources": {"requests": {"storage": SIZE}}},
    }  # fmt: skip


def provision(kube: Kube, namespace: str, storage_class_name: str) -> tuple[list[float], float]:
    """CLAIMS PVCs created back to back: each one's seconds to Bound, and PVCs per second
    from the first create to the last Bound."""
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    created: dict[str, float] = {}
    bound: dict[str, float] = {}
    for i in range(CLAIMS):
        name = f"claim-{i:03d}"
        created[name] = time.monotonic()
        kube.create(claim(name, namespace, storage_class_name))

    def all_bound() -> bool:
        now = time.monotonic()
        for pvc in kube.list("v1", "PersistentVolumeClaim", namespace):
            name = pvc["metadata"]["name"]
            if name not in bound and (pvc.get("status") or {}).get("phase") == "Bound":
                bound[name] = now
        return len(bound) == CLAIMS

    timed_wait(f"{CLAIMS} PVCs of {storage_class_name} Bound", all_bound, 1800)
    first, last = min(created.values()), max(bound.values())
    return [bound[n] - created[n] for n in created], CLAIMS / (last - first)


def run(workdir: Path) -> Result:
    result = Result("provisioning", f"Provisioning: {CLAIMS} PVCs at once",
                    baseline="csi-test mock driver")  # fmt: skip
    mock_driver = ensure_mock_driver()
    with demo.stack(workdir, STORAGE, ()) as (cluster, lab), ExitStack() as down:
        demo.start_components(cluster, lab, down, STORAGE, ())
        kube = cluster.kube
        lab_pool(cluster, POOL, len(STORAGE), min_size="1Gi")
        # The provisioner asks for the topology of a node that runs the driver: a KWOK one.
        driver = {
            "name": resources.CSI_DRIVER,
            "topologyKeys": [TOPOLOGY_KEY],
            "nodeID": "nqn.2014-08.org.nvmexpress:uuid:be000000-0000-4000-8000-000000000001",
        }
        cluster.add_fake_node("bench-gpu", labels={TOPOLOGY_KEY: "default"}, csi_drivers=[driver])
        kube.create(
            storage_class(
                "bench-flashmesh",
                resources.CSI_DRIVER,
                {"pool": POOL, "stripeWidth": "1", "replicas": "1"},
            )
        )
        kube.create(storage_class("bench-mock", MOCK, {}))

        say("starting csi-test's mock driver and a csi-provisioner for it")
        socket = workdir / "mock.sock"
        logs = workdir / "logs"
        mock = processes.spawn(
            [str(mock_driver), "--name", MOCK],
            logs / "mock-driver.log",
            die_with_parent=True,
            env={"CSI_ENDPOINT": f"unix://{socket}"},
        )
        down.callback(processes.end, mock)
        if not processes.wait_until(socket.is_socket, 60):
            raise RuntimeError(f"the mock driver did not start: see {logs / 'mock-driver.log'}")
        provisioner = processes.spawn(
            [str(locate_csi().csi_provisioner), f"--csi-address={socket}",
             f"--kubeconfig={cluster.kubeconfig}", "--timeout=300s", "--v=2"],
            logs / "mock-provisioner.log", die_with_parent=True,
        )  # fmt: skip
        down.callback(processes.end, provisioner)

        mock_times, mock_rate = provision(kube, "bench-mock", "bench-mock")
        fm_times, fm_rate = provision(kube, "bench-flashmesh", "bench-flashmesh")

    result.add("PVC to Bound, p50", "s", percentile(fm_times, 50), percentile(mock_times, 50))
    result.add("PVC to Bound, p95", "s", percentile(fm_times, 95), percentile(mock_times, 95))
    result.add("PVCs Bound per second", "1/s", fm_rate, mock_rate, better="higher")
    result.notes += [
        f"{CLAIMS} PVCs of {SIZE}, created back to back; FlashMesh places them over two"
        " storage VMs, each Bound only once its segment is exported over NVMe/TCP.",
        "The storage agents run in software-emulated VMs, where lvcreate and configfs"
        " writes are slow; the mock driver does no storage work at all.",
    ]
    return result
