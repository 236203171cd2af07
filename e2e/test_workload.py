"""A TrainingWorkload from `kubectl apply` to Succeeded, on KWOK GPU nodes: the operator
(a `flashmesh operator` process) runs ETL, snapshots the dataset, trains two replicas on
two nodes reading it read-only with a checkpoint volume each, snapshots replica 0's
checkpoint into the model and serves it. Every volume is real: the CSI sidecars and the
FlashMesh controller provision, attach, snapshot and restore them on the storage agents
in the VMs. KWOK runs the pods and completes the Jobs (the lab has no kubelet).

The operator is SIGKILLed as each phase begins and started again: the workload still
reaches Succeeded, and every object exists once. Then Debian's Prometheus scrapes every
component's /metrics and a few series are read back through its HTTP API."""

from __future__ import annotations

import json
import os
import signal
import socket as sockets
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from agents import (
    AGENT_METRICS,
    CONTROLLER_METRICS,
    NAMESPACE,
    NODE_METRICS,
    NODES,
    OPERATOR_METRICS,
    POOL,
    agent_log,
)
from csi import (
    controller,
    controller_log,
    node_log,
    node_stub,
    start_node_plugin,
    stop_node_plugin,
)
from helpers import GPU0, GPU1, Scenario

from flashmesh.core import resources, workloads
from flashmesh.core.pools import POOL_LABEL
from flashmesh.csi_driver._proto import csi_pb2
from flashmesh.csi_driver.controller import TOPOLOGY_KEY
from flashmesh.kube import Kube
from flashmesh.lab import demo_workload, processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.kubelet import StandInKubelet
from flashmesh.lab.sidecars import Sidecars
from flashmesh.lab.vm import Lab

pytestmark = pytest.mark.kernel

API = resources.API_VERSION
NS = "default"
WL = "mnist"
GPU_NODES = {  # KWOK nodes with two GPUs each; host NQNs no VM claims
    "train-a": "nqn.2014-08.org.nvmexpress:uuid:7a000000-0000-4000-8000-00000000000a",
    "train-b": "nqn.2014-08.org.nvmexpress:uuid:7a000000-0000-4000-8000-00000000000b",
}
ANYWHERE = [{"operator": "Exists"}]  # KWOK nodes' taints


@dataclass
class Operator:
    """`flashmesh operator` as its own process, to be killed."""

    cluster: LocalCluster
    lab: Lab
    proc: subprocess.Popen[bytes] | None = None
    kills: int = 0

    def start(self) -> None:
        log = (self.lab.workdir / "operator.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flashmesh.cli", "operator", "--kubeconfig",
             str(self.cluster.kubeconfig), "--namespace", NAMESPACE, "--resync", "1",
             "--metrics-port", str(OPERATOR_METRICS)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return (self.lab.workdir / "operator.log").read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def operator(
    lab: Lab, agents: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    socket = tmp_path_factory.mktemp("csi") / "controller.sock"
    kube = agents.kube
    with controller(lab, agents, str(socket), metrics=CONTROLLER_METRICS):
        for node, nqn in GPU_NODES.items():
            if kube.get("v1", "Node", node) is None:
                driver = {"name": resources.CSI_DRIVER, "nodeID": nqn,
                          "topologyKeys": [TOPOLOGY_KEY]}  # fmt: skip
                agents.add_fake_node(node, labels={TOPOLOGY_KEY: "default", "gpu": "yes"},
                                     gpus=2, csi_drivers=[driver])  # fmt: skip
        sidecars = Sidecars(agents, socket, lab.workdir / "sidecars-workload")
        sidecars.start()  # installs the snapshot CRDs too
        # Classes of this pool made by hand in other scenarios give way to the operator's.
        for api, kind in (("storage.k8s.io/v1", "StorageClass"),
                          ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass")):  # fmt: skip
            found = kube.get(api, kind, f"flashmesh-{POOL}") or {"metadata": {}}
            if found["metadata"] and POOL_LABEL not in (found["metadata"].get("labels") or {}):
                kube.delete(api, kind, f"flashmesh-{POOL}")
        running = Operator(agents, lab)
        running.start()
        try:
            yield running
        finally:
            running.stop()
            sidecars.stop()


def free_port() -> int:
    with sockets.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stage(command: str, **extra: Any) -> dict[str, Any]:
    """A stage for the KWOK GPU nodes only: on a GPU VM's node (registered by other
    scenarios for the kubelet stand-in) KWOK would never finish the pod."""
    return {"image": "busybox", "command": ["sh", "-c", command], "tolerations": ANYWHERE,
            "nodeSelector": {"gpu": "yes"}, **extra}  # fmt: skip


def phase(kube: Kube) -> str:
    found = kube.get(API, "TrainingWorkload", WL, NS) or {}
    return str((found.get("status") or {}).get("phase") or "")


def owned(kube: Kube, api: str, kind: str) -> dict[str, dict[str, Any]]:
    items = kube.list(api, kind, NS, f"{workloads.WORKLOAD_LABEL}={WL}")
    return {o["metadata"]["name"]: o for o in items}


def test_a_workload_walks_etl_training_inference_through_operator_kills(
    lab: Lab, agents: LocalCluster, operator: Operator, scenario: Scenario
) -> None:
    kube = agents.kube
    kube.create({
        "apiVersion": API, "kind": "TrainingWorkload",
        "metadata": {"name": WL, "namespace": NS},
        "spec": {"dataset": {"size": "64Mi", "pool": POOL}, "stages": {
            "etl": stage("write the dataset to /data"),
            "training": stage("train on /data, checkpoint to /checkpoint", replicas=2,
                              gpusPerReplica=2, checkpointSize="32Mi"),
            "inference": stage("serve /model"),
        }},
    })  # fmt: skip

    # Each phase's first moments (its objects being made) are when the operator dies.
    seen: list[str] = []

    def next_phase() -> bool:
        current = phase(kube)
        if current and (not seen or seen[-1] != current):
            seen.append(current)
            if current not in ("Succeeded", "Failed"):
                operator.kill()
                operator.start()
        return current in ("Succeeded", "Failed")

    finished = processes.wait_until(next_phase, 1200, interval=0.3)
    status = (kube.get(API, "TrainingWorkload", WL, NS) or {}).get("status")
    assert finished and phase(kube) == "Succeeded", (
        f"{seen}\n{status}\n{operator.log()}\n{controller_log(lab)}\n{agent_log(lab, 'storage-0')}"
    )
    assert seen == ["ETL", "Training", "Inference", "Succeeded"], seen
    assert operator.kills == 3

    # Every object once, with the access modes and mounts of its stage.
    jobs = owned(kube, "batch/v1", "Job")
    assert sorted(jobs) == [f"{WL}-etl", f"{WL}-train"]
    snapshots = owned(kube, "snapshot.storage.k8s.io/v1", "VolumeSnapshot")
    assert sorted(snapshots) == [f"{WL}-checkpoint", f"{WL}-dataset"]
    assert sorted(owned(kube, "apps/v1", "Deployment")) == [f"{WL}-inference"]
    claims = owned(kube, "v1", "PersistentVolumeClaim")
    modes = {name: c["spec"]["accessModes"] for name, c in claims.items()}
    checkpoints = sorted(n for n in claims if n.endswith("-checkpoint"))
    assert len(checkpoints) == 2, modes
    assert modes == {
        f"{WL}-dataset": ["ReadWriteOnce"],
        f"{WL}-dataset-ro": ["ReadOnlyMany"],
        f"{WL}-model": ["ReadOnlyMany"],
        **{n: ["ReadWriteOnce"] for n in checkpoints},
    }
    assert all(c["status"]["phase"] == "Bound" for c in claims.values())
    # Each PVC is one FlashMesh Volume; each VolumeSnapshot one FlashMesh Snapshot.
    pvs = {c["spec"]["volumeName"] for c in claims.values()}
    volumes = [v for v in kube.list(API, "Volume") if v["spec"]["csiName"] in pvs]
    assert len(volumes) == len(claims) == 5
    contents = {(s.get("status") or {}).get("boundVolumeSnapshotContentName")
                for s in snapshots.values()}  # fmt: skip
    assert len(contents) == 2 and None not in contents
    # The two training replicas ran on the two GPU nodes, each reading the dataset
    # read-only; the restored PVCs came from the snapshots.
    pods = kube.list("v1", "Pod", NS, f"{workloads.WORKLOAD_LABEL}={WL},"
                                      f"{workloads.STAGE_LABEL}=training")  # fmt: skip
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(GPU_NODES)
    for pod in pods:
        mounts = {m["name"]: m for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["dataset"] == {"name": "dataset", "mountPath": "/data", "readOnly": True}
        assert mounts["checkpoint"]["mountPath"] == "/checkpoint"
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert claims[f"{WL}-dataset-ro"]["spec"]["dataSource"]["name"] == f"{WL}-dataset"
    assert claims[f"{WL}-model"]["spec"]["dataSource"]["name"] == f"{WL}-checkpoint"
    # One "Created" Event per object, whatever the kills interrupted.
    created = Counter(
        e["message"]
        for e in kube.list("v1", "Event", NS)
        if e["involvedObject"].get("name") == WL and e["reason"] == "Created"
    )
    assert len(created) == 8 and set(created.values()) == {1}, created
    stages = (status or {})["stages"]
    assert {stages[s]["state"] for s in ("etl", "training")} == {"Succeeded"}
    assert stages["inference"]["state"] == "Available"

    # Deleting the workload deletes all it made, down to the logical volumes.
    kube.delete(API, "TrainingWorkload", WL, NS)
    gone = processes.wait_until(
        lambda: not [v for v in kube.list(API, "Volume") if v["spec"]["csiName"] in pvs], 600
    )
    assert gone, f"{controller_log(lab)}\n{agent_log(lab, 'storage-0')}"
    scenario.done(
        f"ETL -> Training (2 replicas on 2 GPU nodes) -> Inference -> Succeeded; operator "
        f"SIGKILLed {operator.kills} times; 5 PVCs, 2 snapshots, each made once"
    )


PROMETHEUS = "/usr/bin/prometheus"  # Debian's prometheus package


def query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def value(base: str, promql: str) -> float:
    found = query(base, promql)
    return float(found[0]["value"][1]) if found else float("nan")


def test_prometheus_scrapes_every_component(
    lab: Lab, operator: Operator, tmp_path: Any, scenario: Scenario
) -> None:
    """Debian's Prometheus scrapes the operator and the CSI controller (processes beside the
    API server), the node plugin in a GPU VM and the agents in the storage VMs."""
    start_node_plugin(lab, operator.cluster, GPU0.name)
    node_stub(GPU0.address(0)).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=60)
    targets = {
        "operator": [f"127.0.0.1:{OPERATOR_METRICS}"],
        "csi-controller": [f"127.0.0.1:{CONTROLLER_METRICS}"],
        "csi-node": [f"{GPU0.address(0)}:{NODE_METRICS}"],
        "agent": [f"{n.address(0)}:{AGENT_METRICS}" for n in NODES],
    }
    config = {
        "global": {"scrape_interval": "2s", "scrape_timeout": "2s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": hosts}]}
            for job, hosts in targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def all_up() -> bool:
            try:
                return value(base, "sum(up)") == 5
            except OSError:
                return False

        up = processes.wait_until(all_up, 120, interval=1.0)
        assert up, (
            f"{query(base, 'up') if proc.poll() is None else ''}\n"
            + (tmp_path / "prometheus.log").read_text()[-3000:]
        )
        # A few series, read back through Prometheus's HTTP API.
        capacity = f'flashmesh_pool_capacity_bytes{{job="operator",pool="{POOL}"}}'
        assert value(base, capacity) > 0
        ops = 'sum(flashmesh_csi_operation_duration_seconds_count{job="csi-controller"})'
        assert value(base, ops) > 0
        info = ('flashmesh_csi_operation_duration_seconds_count'
                '{job="csi-node",method="NodeGetInfo",code="OK"}')  # fmt: skip
        assert value(base, info) >= 1
        # An agent's pass histogram has a series once its first pass ends: wait for both.
        passes = "sum by (instance) (flashmesh_agent_reconcile_duration_seconds_count) > 0"
        assert processes.wait_until(lambda: len(query(base, passes)) == 2, 180, interval=2.0), (
            f"{query(base, passes)}\n" + "\n".join(agent_log(lab, n.name)[-3000:] for n in NODES)
        )
        thin = query(base, "flashmesh_agent_thin_pool_size_bytes")
        assert len(thin) == 2 and all(float(t["value"][1]) > 0 for t in thin)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        stop_node_plugin(lab, GPU0.name)
    scenario.done("Prometheus scraped the operator, the CSI controller, a node plugin, 2 agents")


def test_on_the_gpu_vms_the_pods_really_write_and_read_the_data(
    lab: Lab, agents: LocalCluster, operator: Operator, scenario: Scenario
) -> None:
    """The lab's kubelet stand-in runs the pods bound to the GPU VMs' nodes: their volumes
    staged and published by the node plugin in each VM over NVMe/TCP, their commands run
    there. ETL writes a dataset, two replicas on two VMs check it read-only, inference
    serves replica 0's checkpoint."""
    kube = agents.kube
    vms = [GPU0.name, GPU1.name]
    kubelet = StandInKubelet(agents, lab, vms)
    kubelet.register()
    for vm in vms:
        start_node_plugin(lab, agents, vm)
    stop = threading.Event()
    thread = threading.Thread(target=kubelet.run, args=(stop,), daemon=True)
    thread.start()
    name = "demo"
    label = f"{workloads.WORKLOAD_LABEL}={name}"
    try:
        kube.create(demo_workload.workload(name, NS, POOL))

        def served() -> bool:
            pods = kube.list("v1", "Pod", NS, label)
            return (
                phase_of(kube, name) in ("Succeeded", "Failed")
                and not demo_workload.verify(lab, NS, pods).problems
            )

        done = processes.wait_until(served, 900, interval=2.0)
        pods = kube.list("v1", "Pod", NS, label)
        verified = demo_workload.verify(lab, NS, pods)
        assert done and phase_of(kube, name) == "Succeeded", (
            f"{phase_of(kube, name)}: {verified.problems}\n{operator.log()}\n"
            f"{node_log(lab, GPU0.name)}\n{controller_log(lab)}"
        )
        assert not verified.problems, verified.problems
        trainers = [p for p in pods if p["metadata"]["labels"].get(workloads.STAGE_LABEL)
                    == "training"]  # fmt: skip
        assert sorted(p["spec"]["nodeName"] for p in trainers) == sorted(vms)
        assert all(p["status"]["phase"] == "Succeeded" for p in trainers)
    finally:
        kube.delete(API, "TrainingWorkload", name, NS)
        # The inference pod goes with its Deployment: its command is killed, its volume
        # unmounted, and every volume of the workload deleted down to its segments.
        left = processes.wait_until(
            lambda: not kube.list("v1", "PersistentVolumeClaim", NS, label), 300
        )
        stop.set()
        thread.join(60)
        for vm in vms:
            stop_node_plugin(lab, vm)
    assert left, kube.list("v1", "PersistentVolumeClaim", NS, label)
    scenario.done("stand-in kubelet: " + " | ".join(verified.lines))


def phase_of(kube: Kube, name: str) -> str:
    found = kube.get(API, "TrainingWorkload", name, NS) or {}
    return str((found.get("status") or {}).get("phase") or "")
