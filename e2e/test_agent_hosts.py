"""Two nodes with one host NQN: each agent reads its node's SMBIOS UUID, sees the clash
among StorageNodes and the CSI driver's CSINode entries, says so on its StorageNode with a
condition and an Event, and lets that host NQN connect to no export until the clash is gone;
a session it had before is kept, never cut silently."""

from __future__ import annotations

from typing import Any

import pytest
from agents import (
    agent_log,
    create_volume,
    delete_and_wait,
    node_name,
    node_status,
    segments,
)
from helpers import DIRECT_WRITE, GPU1, STORAGE0, STORAGE1, Scenario, sh

from flashmesh.core import naming, resources
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.vm import Lab, host_nqn, vm_uuid

pytestmark = pytest.mark.kernel

SMBIOS = "/sys/class/dmi/id/product_uuid"
CLONE = f"""mount --bind /lab/cloned-product-uuid {SMBIOS}
mount --bind /lab/cloned-hostnqn /etc/nvme/hostnqn
mount --bind /lab/cloned-hostid /etc/nvme/hostid"""
UNCLONE = f"umount {SMBIOS} /etc/nvme/hostnqn /etc/nvme/hostid"


def host_condition(cluster: LocalCluster, vm: str) -> dict[str, Any]:
    conditions = node_status(cluster, node_name(vm)).get("conditions") or []
    return next((c for c in conditions if c["type"] == "HostNQNUnique"), {})


def allowed_hosts(lab: Lab, vm: str, nqn: str) -> list[str]:
    """The subsystem's allowed hosts ([] while the agent has not made it yet)."""
    folder = f"/sys/kernel/config/nvmet/subsystems/{nqn}/allowed_hosts"
    return sh(lab, vm, f"ls {folder} 2>/dev/null || true").split()


def csinode(name: str, node_id: str) -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": name},
        "spec": {"drivers": [{"name": resources.CSI_DRIVER, "nodeID": node_id}]},
    }  # fmt: skip


def test_a_host_nqn_claimed_by_two_nodes_is_refused_until_resolved(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    kube = agents.kube
    shared = host_nqn(STORAGE0.name)
    gpu1 = host_nqn(GPU1.name)
    # storage-1 boots as a clone of storage-0 would: the same SMBIOS UUID and /etc/nvme.
    (lab.workdir / "cloned-product-uuid").write_text(vm_uuid(STORAGE0.name) + "\n")
    (lab.workdir / "cloned-hostnqn").write_text(shared + "\n")
    (lab.workdir / "cloned-hostid").write_text(vm_uuid(STORAGE0.name) + "\n")
    sh(lab, STORAGE1.name, CLONE)
    vid = create_volume(kube, "pvc-agent-shared-nqn", [STORAGE1.name], "16Mi", [shared, gpu1])
    nqn = naming.subsystem_nqn(vid, 0, 0)
    try:
        # GPU-1 connects and writes while its host NQN is still its own.
        assert processes.wait_until(lambda: allowed_hosts(lab, STORAGE1.name, nqn) == [gpu1], 120)
        dev = sh(lab, GPU1.name, f"modprobe nvme-tcp\nnvme connect -t tcp "
                 f"-a {STORAGE1.address(0)} -s 4420 -n {nqn} --ctrl-loss-tmo=3 "
                 f"--reconnect-delay=1 >/dev/null\nnvme_device {nqn}").strip()  # fmt: skip
        assert sh(lab, GPU1.name, DIRECT_WRITE.format(dev=dev)).strip() == "0"
        # Then two GPU nodes' CSINodes carry GPU-1's host NQN.
        for name in ("gpu-clone-a", "gpu-clone-b"):
            kube.create(csinode(name, gpu1))

        def clash_seen() -> bool:
            return all(
                host_condition(agents, vm).get("reason") == "DuplicateHostNQN"
                for vm in (STORAGE0.name, STORAGE1.name)
            )

        assert processes.wait_until(clash_seen, 120), agent_log(lab, STORAGE1.name)
        for vm, other in ((STORAGE0.name, STORAGE1.name), (STORAGE1.name, STORAGE0.name)):
            condition = host_condition(agents, vm)
            assert condition["status"] == "False"
            assert f"also claimed by {node_name(other)}" in condition["message"]
            assert "product_uuid" in condition["message"]
            events = kube.list("v1", "Event", namespace="default")
            assert any(
                e["involvedObject"]["name"] == node_name(vm) and e["reason"] == "DuplicateHostNQN"
                for e in events
            )
        assert node_status(agents, node_name(STORAGE1.name))["hostNQN"] == shared

        # Neither shared host NQN is allowed in; the segment's status says why. (A pass that
        # listed the CSINodes before they were made may have let GPU-1 in for a moment.)
        pair = f"nodes {node_name(STORAGE0.name)}, {node_name(STORAGE1.name)}"

        def refused_both() -> bool:
            found = segments(kube, vid)
            why = (found[0].get("message") or "") if found else ""
            return (
                len(found) == 1
                and found[0]["ready"]
                and not found[0].get("hosts")
                and pair in why
                and "nodes gpu-clone-a, gpu-clone-b all claim it" in why
            )

        assert processes.wait_until(refused_both, 120), segments(kube, vid)
        assert processes.wait_until(lambda: allowed_hosts(lab, STORAGE1.name, nqn) == [], 60)
        # Refused new connections only: the session GPU-1 has is kept, and said so.
        assert segments(kube, vid)[0].get("keptHosts") == sorted([shared, gpu1])
        assert sh(lab, GPU1.name, DIRECT_WRITE.format(dev=dev)).strip() == "0", (
            "a live session was cut"
        )
        sh(lab, GPU1.name, f"nvme disconnect -n {nqn} >/dev/null")
        refused = lab.exec(
            GPU1.name, f"nvme connect -t tcp -a {STORAGE1.address(0)} -s 4420 -n {nqn}", check=False
        )
        assert refused.rc != 0, refused.output

        # Resolved: each node has its own identity again, one CSINode holds GPU-1's NQN.
        sh(lab, STORAGE1.name, UNCLONE)
        kube.delete("storage.k8s.io/v1", "CSINode", "gpu-clone-b")
        assert processes.wait_until(
            lambda: sorted(allowed_hosts(lab, STORAGE1.name, nqn)) == sorted([shared, gpu1]), 120
        ), segments(kube, vid)
        for vm in (STORAGE0.name, STORAGE1.name):
            assert processes.wait_until(
                lambda v=vm: host_condition(agents, v).get("status") == "True", 120
            )
        assert node_status(agents, node_name(STORAGE1.name))["hostNQN"] == host_nqn(STORAGE1.name)
    finally:
        lab.exec(GPU1.name, f"nvme disconnect -n {nqn} >/dev/null", check=False)
        sh(lab, STORAGE1.name, f"{UNCLONE} 2>/dev/null || true")
        for name in ("gpu-clone-a", "gpu-clone-b"):
            kube.delete("storage.k8s.io/v1", "CSINode", name)
    assert delete_and_wait(kube, "Volume", vid)
    scenario.done(
        "one host NQN on 2 StorageNodes and on 2 CSINodes: condition + Event on both nodes, "
        "neither allowed, the live session kept writing, a new connect refused; allowed "
        "again once resolved"
    )
