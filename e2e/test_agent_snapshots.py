"""Snapshots, restores and clones on the agents: a Snapshot's segment becomes a thin
snapshot on its node; a Volume restored from it, or cloned from a volume, starts as a copy
that shares blocks with its source. Data read back through NVMe/TCP proves each copy holds
what its source held at that moment."""

from __future__ import annotations

from typing import Any

import pytest
from agents import (
    API,
    agent_log,
    all_ready,
    create_volume,
    delete_and_wait,
    logical_volumes,
    node_name,
    segments,
)
from helpers import GPU0, MIB, STORAGE0, STORAGE1, Scenario, sh

from flashmesh.core import naming
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.vm import Lab, host_nqn

pytestmark = pytest.mark.kernel

GPU = GPU0.name
VM = STORAGE0.name


def connect(lab: Lab, vid: str) -> str:
    nqn = naming.subsystem_nqn(vid, 0, 0)
    return sh(
        lab,
        GPU,
        f"modprobe nvme-tcp\nnvme connect -t tcp -a {STORAGE0.address(0)} -s 4420 -n {nqn}\n"
        f"nvme_device {nqn}",
    ).strip()


def write_random(lab: Lab, device: str, name: str) -> str:
    """8 MiB of fresh random data at the start of the device; their sha256."""
    return sh(
        lab,
        GPU,
        f"head -c 8M /dev/urandom > /run/{name}\n"
        f"dd if=/run/{name} of={device} bs=1M oflag=direct status=none\n"
        f"sha256sum < /run/{name} | cut -d' ' -f1",
    ).strip()


def read_hash(lab: Lab, device: str) -> str:
    return sh(
        lab,
        GPU,
        f"dd if={device} bs=1M count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1",
    ).strip()


def snapshot_status(kube: Any, name: str) -> list[dict[str, Any]]:
    found = kube.get(API, "Snapshot", name) or {}
    return list((found.get("status") or {}).get("segments") or [])


def test_snapshot_restore_and_clone_hold_their_sources_data(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    kube = agents.kube
    gpu = host_nqn(GPU)
    source = create_volume(kube, "pvc-agent-dataset", [VM], "32Mi", [gpu])
    assert processes.wait_until(lambda: all_ready(kube, source), 300), agent_log(lab, VM)
    device = connect(lab, source)
    first = write_random(lab, device, "first")

    snap = naming.snapshot_id("snapshot-agent-dataset")
    thin = naming.segment_lv(snap, 0, 0)
    kube.create({
        "apiVersion": API, "kind": "Snapshot",
        "metadata": {"name": snap, "labels": naming.node_labels([node_name(VM)])},
        "spec": {"csiName": "snapshot-agent-dataset", "sourceVolume": source, "size": "32Mi",
                 "segments": [{"index": 0, "replica": 0, "node": node_name(VM),
                               "thinVolume": thin}]},
    })  # fmt: skip
    taken = processes.wait_until(
        lambda: [s.get("ready") for s in snapshot_status(kube, snap)] == [True], 120
    )
    assert taken, f"{snapshot_status(kube, snap)}\n{agent_log(lab, VM)}"
    assert thin in logical_volumes(lab, VM)
    second = write_random(lab, device, "second")  # the source moves on after the snapshot
    assert second != first
    sh(lab, GPU, f"nvme disconnect -n {naming.subsystem_nqn(source, 0, 0)}")

    # A restore into a bigger volume and a clone of the source, both on the source's node.
    restored = create_volume(kube, "pvc-agent-restored", [VM], "64Mi", [gpu],
                             source={"snapshot": snap})  # fmt: skip
    clone = create_volume(kube, "pvc-agent-clone", [VM], "32Mi", [gpu],
                          source={"volume": source})  # fmt: skip
    # A restore placed away from its snapshot's node is refused, with the reason.
    misplaced = create_volume(kube, "pvc-agent-misplaced", [STORAGE1.name], "32Mi", [gpu],
                              source={"snapshot": snap})  # fmt: skip
    for vid in (restored, clone):
        assert processes.wait_until(lambda v=vid: all_ready(kube, v), 300), segments(kube, vid)

    def refused() -> str:
        return " ".join(s.get("message") or "" for s in segments(kube, misplaced))

    assert processes.wait_until(lambda: "must be placed on its snapshot's node" in refused(), 120)
    assert not any(s["ready"] for s in segments(kube, misplaced))

    restored_device = connect(lab, restored)
    assert read_hash(lab, restored_device) == first
    size = sh(lab, GPU, f"blockdev --getsize64 {restored_device}").strip()
    assert int(size) == 64 * MIB  # grown past its snapshot's size
    assert read_hash(lab, connect(lab, clone)) == second
    lvs = logical_volumes(lab, VM)
    for vid in (source, restored, clone):
        sh(lab, GPU, f"nvme disconnect -n {naming.subsystem_nqn(vid, 0, 0)} || true")

    # Deleting the Snapshot removes its thin volume; the copies do not depend on it.
    assert delete_and_wait(kube, "Snapshot", snap), agent_log(lab, VM)
    assert thin not in logical_volumes(lab, VM)
    for vid in (source, restored, clone, misplaced):
        assert delete_and_wait(kube, "Volume", vid), agent_log(lab, VM)
    assert list(logical_volumes(lab, VM)) == ["thin"]
    scenario.done(
        f"thin snapshot taken ({len(lvs) - 1} LVs at peak); restore (grown to 64Mi) read the "
        "snapshot's data, clone read the source's later data; misplaced restore refused"
    )
