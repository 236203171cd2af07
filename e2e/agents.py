"""Shared pieces of the storage agent scenarios: the agents' pool and nodes, starting and
stopping an agent in a VM, and Volumes written as the CSI controller will write them."""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

from helpers import GPU0, GPU1, STORAGE0, STORAGE1, sh
from prometheus_client.parser import text_string_to_metric_families

from flashmesh.core import naming, resources
from flashmesh.kube import Kube
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.netns import bridge_address
from flashmesh.lab.vm import Lab, VmSpec

API = resources.API_VERSION
POOL = "agents"
NODES = (STORAGE0, STORAGE1)
NAMESPACE = "flashmesh-system"
# The chart's metrics ports: operator, CSI controller, node plugin, agent.
OPERATOR_METRICS, CONTROLLER_METRICS, NODE_METRICS, AGENT_METRICS = 9810, 9811, 9812, 9813

UNEXPORT_ALL = (
    "from flashmesh.dataplane.target import configfs as c, planner as p, model as m; "
    "fs = c.Fs(c.NVMET_ROOT); c.apply(fs, p.plan(m.Target(), c.observe(fs)))"
)


# An xfs superblock over sector 0 of an ext4 drive; blkid then exits 8.
AMBIVALENT = """
d={drive}
mkfs.xfs -q -f $d && dd if=$d of=/tmp/xfs-sb bs=512 count=1 status=none
mkfs.ext4 -q -F $d && dd if=/tmp/xfs-sb of=$d bs=512 count=1 conv=notrunc status=none
rc=0; blkid -p $d >/dev/null 2>&1 || rc=$?
test $rc = 8 || {{ echo "blkid -p $d exits $rc, not 8"; exit 1; }}
"""


def node_name(vm: str) -> str:
    """The agents' StorageNode names, apart from the samples other tests create."""
    return f"agent-{vm}"


def agent_log(lab: Lab, vm: str) -> str:
    return (lab.workdir / f"agent-{vm}.log").read_text(errors="replace")[-3000:]


def agent_command(spec: VmSpec, extra: str = "") -> str:
    return (
        f"{sys.executable} -m flashmesh.cli agent --node {node_name(spec.name)} "
        f"--address {spec.address(0)} --kubeconfig /lab/agent.kubeconfig "
        f"--metrics-port {AGENT_METRICS} {extra}"
        f">> /lab/agent-{spec.name}.log 2>&1"
    )


def start_agent(lab: Lab, spec: VmSpec) -> None:
    """The agent as a long-running process in the VM, its log in the lab's share."""
    lab.spawn(spec.name, f"exec {agent_command(spec)}")


def lease_renewed(cluster: LocalCluster, vm: str) -> str:
    """When the node's agent last renewed its Lease ("" if never): a new value after a
    start says the new agent runs (a stopped one leaves its node's phase Ready for a while)."""
    lease = cluster.kube.get(
        "coordination.k8s.io/v1", "Lease", naming.node_lease(node_name(vm)), NAMESPACE
    )
    return str(((lease or {}).get("spec") or {}).get("renewTime") or "")


def agent_running(lab: Lab, spec: VmSpec) -> bool:
    return lab.exec(spec.name, "pgrep -f 'flashmesh.cli agent'", check=False).rc == 0


def fabric_up(lab: Lab, spec: VmSpec) -> None:
    """storage-0's fabric link carries soft-RoCE, storage-1's does not: made when the
    session starts and again after every reboot of storage-0."""
    if spec.name == STORAGE0.name:
        sh(lab, spec.name, "rxe_up eth0")


def restart_storage(lab: Lab, spec: VmSpec) -> None:
    """A storage VM killed by a scenario booted again, with its fabric and its agent."""
    lab.restart(spec.name)
    fabric_up(lab, spec)
    start_agent(lab, spec)


def stop_agent(lab: Lab, spec: VmSpec) -> None:
    lab.exec(spec.name, "pkill -f 'flashmesh.cli agent' || true", check=False)
    assert processes.wait_until(
        lambda: lab.exec(spec.name, "pgrep -f 'flashmesh.cli agent'", check=False).rc != 0, 60
    )


def run_agents(lab: Lab, crds: LocalCluster) -> Iterator[LocalCluster]:
    """The pool and StorageNodes the operator will own (spec.pool set by hand until it
    lands), the agents' namespace, and an agent running in each storage VM."""
    kube = crds.kube
    kube.create({
        "apiVersion": API, "kind": "StoragePool", "metadata": {"name": POOL},
        "spec": {"nodeSelector": {"matchLabels": {"pool": POOL}},
                 # The default drive patterns: udev's /dev/disk/by-id names.
                 "drives": {"minSize": "900Mi"},
                 "transports": ["rdma", "tcp"]},
    })  # fmt: skip
    if kube.get("v1", "Namespace", NAMESPACE) is None:
        kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    kubeconfig = lab.workdir / "agent.kubeconfig"  # in the lab's share: every VM sees it
    kubeconfig.write_text(crds.portable_kubeconfig(bridge_address(0)))
    # storage-0 has soft-RoCE on its fabric link, storage-1 has not; storage-1's third drive
    # holds a filesystem that the pool's selection matches, and its fourth an ext4 and an
    # xfs superblock at once (what blkid calls ambivalent, exit 8: a drive reused without
    # wiping), which read as blank before.
    fabric_up(lab, STORAGE0)
    ext4, both = (lab.drive_serial(STORAGE1.name, n) for n in (2, 3))
    sh(lab, STORAGE1.name, f"mkfs.ext4 -q -F $(drive_by_serial {ext4})")
    sh(lab, STORAGE1.name, AMBIVALENT.format(drive=f"$(drive_by_serial {both})"))
    for spec in NODES:
        kube.create({"apiVersion": API, "kind": "StorageNode",
                     "metadata": {"name": node_name(spec.name), "labels": {"pool": POOL}},
                     "spec": {"pool": POOL}})  # fmt: skip
        start_agent(lab, spec)
    # Every scenario starts with both nodes serving (the first pass makes the thin pools).
    for spec in NODES:
        name = node_name(spec.name)
        ready = processes.wait_until(
            lambda n=name: node_status(crds, n).get("phase") == "Ready",
            300,  # type: ignore[misc]
        )
        assert ready, f"{name}: {node_status(crds, name)}\n{agent_log(lab, spec.name)}"
    try:
        yield crds
    finally:
        for spec in NODES:
            lab.exec(spec.name, "pkill -f 'flashmesh.cli agent' || true", check=False)
            # Whatever a failed test left exported goes, so later scenarios find a clean
            # target: FlashMesh's own planner, asked for nothing.
            lab.exec(spec.name, f"{sys.executable} -c '{UNEXPORT_ALL}'", check=False)


def leave_nothing_behind(lab: Lab, cluster: LocalCluster) -> None:
    """Every Snapshot and Volume deleted through running agents (one a scenario stopped is
    started again), and the GPU VMs' NVMe connections and stripes gone."""
    revived = lab.revive()  # a scenario that failed with a VM down left it down
    for gpu in (GPU0, GPU1):
        lab.exec(gpu.name, "dmsetup remove_all; mdadm --stop --scan; nvme disconnect-all",
                 check=False)  # fmt: skip
    for spec in NODES:
        if spec.name in revived:
            fabric_up(lab, spec)
        if not agent_running(lab, spec):
            start_agent(lab, spec)
    kube = cluster.kube
    for kind in ("Snapshot", "Volume"):
        names = [o["metadata"]["name"] for o in kube.list(API, kind)]
        for name in names:
            kube.delete(API, kind, name)
        gone = processes.wait_until(lambda k=kind: not kube.list(API, k), 300)  # type: ignore[misc]
        assert gone, f"{kind}s left after the scenario: {names}\n{agent_log(lab, STORAGE0.name)}"


def create_volume(
    kube: Kube,
    csi_name: str,
    vms: list[str],
    segment: str,
    hosts: list[str],
    source: dict[str, str] | None = None,
) -> str:
    """A Volume striped over one segment per VM's node, as the CSI controller will write
    it; its id."""
    vid = naming.volume_id(csi_name)
    segments = [
        {"index": i, "replica": 0, "node": node_name(vm), "size": segment}
        for i, vm in enumerate(vms)
    ]
    size = f"{len(vms) * int(segment.removesuffix('Mi'))}Mi"
    spec = {"csiName": csi_name, "pool": POOL, "size": size,
            "layout": {"stripeWidth": len(vms), "replicas": 1},
            "segments": segments, "hosts": hosts}  # fmt: skip
    if source:
        spec["source"] = source
    meta = {"name": vid, "labels": naming.node_labels([node_name(vm) for vm in vms])}
    kube.create({"apiVersion": API, "kind": "Volume", "metadata": meta, "spec": spec})
    return vid


def set_hosts(kube: Kube, vid: str, hosts: list[str]) -> None:
    data = kube.get(API, "Volume", vid)
    assert data is not None
    data["spec"]["hosts"] = hosts
    kube.replace(data)


def segments(kube: Kube, vid: str) -> list[dict[str, Any]]:
    volume = kube.get(API, "Volume", vid) or {}
    return list((volume.get("status") or {}).get("segments") or [])


def all_ready(kube: Kube, vid: str, count: int = 1) -> bool:
    found = segments(kube, vid)
    return len(found) == count and all(s["ready"] for s in found)


def delete_and_wait(kube: Kube, kind: str, name: str, timeout: float = 300) -> bool:
    kube.delete(API, kind, name)
    return processes.wait_until(lambda: kube.get(API, kind, name) is None, timeout)


def node_status(cluster: LocalCluster, name: str) -> dict[str, Any]:
    return (cluster.kube.get(API, "StorageNode", name) or {}).get("status") or {}


def exported(lab: Lab, vm: str) -> tuple[list[str], list[str]]:
    """The subsystems in a storage VM's nvmet configfs, and its ports' subsystem links."""
    subsystems = sh(lab, vm, "ls /sys/kernel/config/nvmet/subsystems").split()
    links = sh(lab, vm, "ls /sys/kernel/config/nvmet/ports/*/subsystems").split()
    return subsystems, [x for x in links if x.startswith("nqn.")]


def logical_volumes(lab: Lab, vm: str) -> dict[str, int]:
    """The pool's logical volumes in a storage VM, with their sizes in bytes."""
    out = sh(lab, vm, f"lvs --noheadings --units b --nosuffix -o lv_name,lv_size flashmesh-{POOL}")
    return {name: int(size) for name, size in (line.split() for line in out.splitlines())}


def agent_passes(spec: VmSpec) -> dict[str, float]:
    """The agent's passes so far by trigger (start, event, retry, resync), from its
    /metrics; `finished` counts the passes that have ended."""
    url = f"http://{spec.address(0)}:{AGENT_METRICS}/metrics"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    found = {"start": 0.0, "event": 0.0, "retry": 0.0, "resync": 0.0, "finished": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "flashmesh_agent_passes_total":
                found[s.labels["trigger"]] = s.value
            elif s.name == "flashmesh_agent_reconcile_duration_seconds_count":
                found["finished"] += s.value
    return found
