"""`make demo`: FlashMesh end to end on this machine. A real control plane and four QEMU
VMs on Debian's kernel (two storage nodes with an emulated NVMe drive each, two GPU
nodes), the storage agents and node plugins in the VMs, the CSI controller with the
upstream sidecars and the operator beside the API server, the lab's kubelet stand-in for
the GPU VMs' nodes; then a StoragePool and a TrainingWorkload are applied, and the
workload's own pods write the dataset once and read it on two GPU VMs over NVMe/TCP.
Everything is stopped and removed at the end (pass or fail)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from flashmesh import status as status_view
from flashmesh.core import resources
from flashmesh.lab import demo_workload, processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.crds import install_admission_policies, install_crds
from flashmesh.lab.kubelet import NODE_PORT, StandInKubelet
from flashmesh.lab.netns import LabNetwork, bridge_address
from flashmesh.lab.progress import say
from flashmesh.lab.sidecars import Sidecars
from flashmesh.lab.vm import Drive, Lab, VmSpec

API = resources.API_VERSION
NAMESPACE = "flashmesh-system"
POOL = "demo"
WORKLOAD = "demo"
STORAGE = tuple(
    VmSpec(f"storage-{i}", 1 + i, drives=(Drive(1024),), memory_mib=384) for i in range(2)
)
GPUS = tuple(VmSpec(f"gpu-{i}", 3 + i) for i in range(2))
PYTHON = sys.executable


def _process(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return processes.spawn(argv, log, die_with_parent=True)


@contextmanager
def stack(
    workdir: Path, storage: Sequence[VmSpec] = STORAGE, gpus: Sequence[VmSpec] = GPUS
) -> Iterator[tuple[LocalCluster, Lab]]:
    """The whole lab, up; torn down when the block ends."""
    with ExitStack() as down:
        network = LabNetwork(links=1)
        network.create()
        down.callback(network.destroy)
        network.enter()  # this process and all it starts share the VMs' network
        say("starting the control plane (etcd, apiserver, controller-manager, scheduler, kwok)")
        cluster = LocalCluster(
            workdir / "cluster", extra_addresses=[bridge_address(0)], bind_all=True,
            stand_in_nodes=[g.name for g in gpus],
        )  # fmt: skip
        cluster.start()
        down.callback(cluster.stop)
        install_crds(cluster)
        install_admission_policies(cluster)
        specs = [*storage, *gpus]
        say(f"booting {len(specs)} VMs on Debian's kernel (software emulation: a few minutes)")
        lab = Lab(workdir / "vms", network=network)
        down.callback(lab.down)
        lab.up(specs)
        yield cluster, lab


def start_components(
    cluster: LocalCluster,
    lab: Lab,
    down: ExitStack,
    storage: Sequence[VmSpec] = STORAGE,
    gpus: Sequence[VmSpec] = GPUS,
) -> None:
    kube = cluster.kube
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    (lab.workdir / "agent.kubeconfig").write_text(cluster.portable_kubeconfig(bridge_address(0)))
    common = f"--kubeconfig /lab/agent.kubeconfig --namespace {NAMESPACE}"
    storage_label = {"flashmesh.dev/storage": "true"}
    for spec in storage:
        kube.create({"apiVersion": API, "kind": "StorageNode",
                     "metadata": {"name": spec.name, "labels": storage_label}})  # fmt: skip
        say(f"starting the storage agent in {spec.name}")
        lab.spawn(spec.name, f"exec {PYTHON} -m flashmesh.cli agent --node {spec.name} "
                             f"--address {spec.address(0)} {common} "
                             f"--metrics-port 9813 >> /lab/agent-{spec.name}.log 2>&1")  # fmt: skip
    for spec in gpus:
        say(f"starting the CSI node plugin in {spec.name}")
        endpoints = f"--endpoint unix:///run/csi/csi.sock --endpoint 0.0.0.0:{NODE_PORT}"
        out = f">> /lab/csi-node-{spec.name}.log 2>&1"
        lab.spawn(spec.name, f"export FLASHMESH_NODE_STATE=/run/flashmesh-node\n"
                             f"exec {PYTHON} -m flashmesh.cli csi --mode node {endpoints} "
                             f"{common} --metrics-port 9812 {out}")  # fmt: skip
    socket = lab.workdir / "csi-controller.sock"
    logs = lab.workdir / "logs"
    say("starting the CSI controller, the CSI sidecars and the operator")
    controller = _process(
        [PYTHON, "-m", "flashmesh.cli", "csi", "--mode", "controller",
         "--endpoint", f"unix://{socket}", "--kubeconfig", str(cluster.kubeconfig),
         "--namespace", NAMESPACE, "--metrics-port", "9811"],
        logs / "csi-controller.log",
    )  # fmt: skip
    down.callback(processes.end, controller)
    if not processes.wait_until(socket.is_socket, 120):
        raise RuntimeError(f"the CSI controller did not start: see {logs / 'csi-controller.log'}")
    sidecars = Sidecars(cluster, socket, logs)
    sidecars.start()
    down.callback(sidecars.stop)
    operator = _process(
        [PYTHON, "-m", "flashmesh.cli", "operator", "--kubeconfig", str(cluster.kubeconfig),
         "--namespace", NAMESPACE, "--resync", "2", "--metrics-port", "9810"],
        logs / "operator.log",
    )  # fmt: skip
    down.callback(processes.end, operator)


def wait_for(what: str, condition: Any, timeout: float) -> None:
    begin = time.monotonic()
    if not processes.wait_until(condition, timeout, interval=1.0):
        raise RuntimeError(f"{what}: not within {timeout:.0f} s")
    say(f"{what} ({time.monotonic() - begin:.0f} s)")


def run_workload(cluster: LocalCluster, lab: Lab) -> demo_workload.Verified:
    """The pool and the workload applied; their progress shown; the pods' data checks."""
    kube = cluster.kube
    kube.create({
        "apiVersion": API, "kind": "StoragePool", "metadata": {"name": POOL},
        "spec": {"nodeSelector": {"matchLabels": {"flashmesh.dev/storage": "true"}},
                 "drives": {"pathPatterns": ["/dev/nvme*n1"], "minSize": "900Mi"},
                 "transports": ["tcp"], "defaultVolumeSize": "64Mi"},
    })  # fmt: skip

    def pool_ready() -> bool:
        found = kube.get(API, "StoragePool", POOL) or {}
        return (found.get("status") or {}).get("nodesReady") == len(STORAGE)

    wait_for("StoragePool demo: both storage nodes serving", pool_ready, 600)
    kube.create(demo_workload.workload(WORKLOAD, "default", POOL))
    say("TrainingWorkload demo applied: ETL, then training on both GPU VMs, then inference")
    seen: list[str] = []

    def phase() -> str:
        found = kube.get(API, "TrainingWorkload", WORKLOAD, "default") or {}
        current = str((found.get("status") or {}).get("phase") or "")
        if current and (not seen or seen[-1] != current):
            seen.append(current)
            message = next(
                (c.get("message") for c in (found.get("status") or {}).get("conditions") or []
                 if c["type"] == "Progressing"), "")  # fmt: skip
            say(f"workload phase {current}: {message}")
        return current

    label = f"flashmesh.dev/workload={WORKLOAD}"

    def served() -> bool:
        pods = kube.list("v1", "Pod", "default", label)
        return (
            phase() in ("Succeeded", "Failed")
            and not demo_workload.verify(lab, "default", pods).problems
        )

    wait_for("the workload's pods finished their data checks", served, 1200)
    return demo_workload.verify(lab, "default", kube.list("v1", "Pod", "default", label))


def main(workdir: Path) -> int:
    with stack(workdir) as (cluster, lab), ExitStack() as down:
        start_components(cluster, lab, down)
        kubelet = StandInKubelet(cluster, lab, [g.name for g in GPUS])
        kubelet.register()
        stop = threading.Event()
        thread = threading.Thread(target=kubelet.run, args=(stop,), daemon=True)
        thread.start()
        down.callback(thread.join, 180)  # (callbacks run last first: stop, then join)
        down.callback(stop.set)
        verified = run_workload(cluster, lab)
        print("\nWhat the workload's pods printed (their commands ran in the GPU VMs, run by the")
        print("lab's kubelet stand-in, on FlashMesh volumes attached over NVMe/TCP):")
        for line in verified.lines:
            print(f"  {line}")
        print("\n$ flashmesh status")
        print(status_view.render(status_view.tables(cluster.kube)), end="")
        if verified.problems:
            print("\nDATA CHECK FAILED:\n  " + "\n  ".join(verified.problems))
            return 1
        print("Data check passed: the dataset ETL wrote was read intact by both training")
        print("replicas, and inference serves replica 0's checkpoint. Tearing the lab down.")
    return 0
