"""Surviving faults without losing a write, in the lab.

- A mirrored volume (replicas: 2, md RAID1 over segments on storage-0 and storage-1) under
  fio --verify on GPU-0 while storage-1 is hard-killed: I/O goes on with zero verify
  errors (the stall is measured and printed), the Volume's status records the replica
  behind; storage-1 comes back, its replica is re-added and resynced through the bitmap,
  and both replicas hold the same bytes (checksums of their data on the storage VMs).
- A storage VM powered off for 3 minutes: a single-segment and a striped volume of the
  default class stall and resume on its return with zero verify errors; a fail-fast
  class fails a write within keep-alive + its fast_io_fail_tmo instead.
- The node plugin and both agents restarted (new processes) while fio --verify runs on a
  volume striped over both storage VMs: zero errors."""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from agents import (
    API,
    NODES,
    POOL,
    agent_log,
    agent_passes,
    node_name,
    restart_storage,
    start_agent,
    stop_agent,
)
from csi import controller, controller_log, controller_stub, node_log, node_stub, start_node_plugin
from helpers import DIRECT_WRITE, GPU0, Scenario, sh

from flashmesh.core import mirrors, naming
from flashmesh.csi_driver._proto import csi_pb2
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.vm import Lab, VmSpec, host_nqn

pytestmark = [pytest.mark.kernel, pytest.mark.second_lab]

Mode = csi_pb2.VolumeCapability.AccessMode
BLOCK = csi_pb2.VolumeCapability(
    block=csi_pb2.VolumeCapability.BlockVolume(),
    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER),
)
VM = GPU0.name
# fio's region: small, so a verify pass takes seconds and a scenario's waits for "two more
# passes" are short; the stall probe writes beyond it.
FIO_MIB = 16
PROBE_BLOCK = 16384  # 4 KiB block number 16384: 64 MiB in
CHECKSUM_MIB = (PROBE_BLOCK >> 8) + 1  # the replicas are compared up to the probe's block
# How long a storage VM stays powered off in the outage scenario (a reboot's length).
OUTAGE_SECONDS = int(os.environ.get("FLASHMESH_OUTAGE_SECONDS", "180"))


@dataclass
class Driver:
    controller: Any
    node: Any


@pytest.fixture(scope="module")
def driver(lab: Lab, agents: LocalCluster) -> Iterator[Driver]:
    with controller(lab, agents) as address:
        start_node_plugin(lab, agents, VM)
        yield Driver(controller_stub(address), node_stub(GPU0.address(0)))


@dataclass
class Staged:
    volume: csi_pb2.Volume
    device: str
    publish_context: dict[str, str]


def stage(driver: Driver, name: str, mib: int, **parameters: str) -> Staged:
    volume = driver.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=mib << 20),
            volume_capabilities=[BLOCK], parameters={"pool": POOL, "transport": "tcp",
                                                     **parameters},
        ),
        timeout=600,
    ).volume  # fmt: skip
    vid = volume.volume_id
    published = driver.controller.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=host_nqn(VM), volume_capability=BLOCK,
            volume_context=volume.volume_context,
        ),
        timeout=600,
    )  # fmt: skip
    staged = Staged(volume, f"/run/faults/{vid}/device", dict(published.publish_context))
    stage_on_node(driver, staged)
    return staged


def stage_on_node(driver: Driver, staged: Staged) -> None:
    """NodeStage and NodePublish of a volume already published to the GPU VM."""
    vid, context = staged.volume.volume_id, staged.volume.volume_context
    staging = f"/run/faults/{vid}/staging"
    driver.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, publish_context=staged.publish_context,
            staging_target_path=staging, volume_capability=BLOCK, volume_context=context,
        ),
        timeout=600,
    )  # fmt: skip
    driver.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=staging, target_path=staged.device,
            volume_capability=BLOCK, volume_context=context,
        ),
        timeout=300,
    )  # fmt: skip


def unstage(driver: Driver, staged: Staged) -> None:
    unstage_only(driver, staged)
    delete(driver, staged)


class VerifyLoop:
    """fio --verify passes over the device, one after another, until stopped; each pass
    writes the region with checksums and reads every block back."""

    def __init__(self, lab: Lab, device: str, tag: str) -> None:
        self.lab, self.tag = lab, tag
        self.log = f"/run/faults/{tag}.passes"
        script = (
            f"rm -f /run/faults/{tag}.stop; : > {self.log}; i=0\n"
            f"while [ ! -e /run/faults/{tag}.stop ]; do\n"
            f"  i=$((i + 1))\n"
            f"  if fio --name=p$i --filename={device} --direct=1 --ioengine=libaio"
            f" --rw=randwrite --bs=16k --iodepth=4 --size={FIO_MIB}M --verify=crc32c"
            f" --verify_fatal=1 --randrepeat=0 > /run/faults/{tag}.$i.out 2>&1; then\n"
            f'    echo "$(date +%s.%N) pass $i ok" >> {self.log}\n'
            f"  else\n"
            f'    echo "$(date +%s.%N) pass $i FAILED" >> {self.log}\n'
            f"    tail -20 /run/faults/{tag}.$i.out >> {self.log}\n"
            f"  fi\n"
            f"done"
        )
        lab.exec(VM, "mkdir -p /run/faults")
        self.job = lab.spawn(VM, script)

    def passes(self) -> list[str]:
        out = self.lab.exec(VM, f"cat {self.log} 2>/dev/null || true", check=False).output
        return [line for line in out.splitlines() if " pass " in line]

    def ok_after(self, count: int) -> bool:
        return sum(1 for p in self.passes() if p.endswith(" ok")) >= count

    def stop(self) -> list[str]:
        self.lab.exec(VM, f"touch /run/faults/{self.tag}.stop")
        self.lab.wait(VM, self.job, timeout=600)
        return self.passes()


def start_probe(lab: Lab, device: str, tag: str = "probe") -> str:
    """Small synchronous writes past fio's region, each completion's time logged: the
    longest gap is how long writes stalled."""
    return lab.spawn(VM, (
        f"rm -f /run/faults/{tag}.stop; : > /run/faults/{tag}\n"
        f"while [ ! -e /run/faults/{tag}.stop ]; do\n"
        f"  dd if=/dev/zero of={device} bs=4k count=1 seek={PROBE_BLOCK} oflag=direct,dsync"
        f" conv=notrunc 2>/dev/null && date +%s.%N >> /run/faults/{tag}\n"
        "done"
    ))  # fmt: skip


def stage_calls(lab: Lab) -> int:
    """NodeStage and NodeUnstage calls the GPU VM's node plugin has had (its whole log)."""
    text = (lab.workdir / f"csi-node-{VM}.log").read_text(errors="replace")
    return len(re.findall(r"Node(?:Un)?StageVolume request", text))


def controllers_of(lab: Lab, vid: str) -> set[str]:
    """The GPU VM's NVMe controllers of a volume's segments (from sysfs)."""
    prefix = naming.subsystem_nqn(vid, 0, 0).rsplit(".", 1)[0] + "."
    return set(sh(lab, VM, (
        "for c in /sys/class/nvme/nvme*; do case \"$(cat $c/subsysnqn)\" in "
        f"{prefix}*) basename $c;; esac; done; true"
    )).split())  # fmt: skip


def probe_writes(lab: Lab, tag: str = "probe") -> int:
    """How many of the probe's writes have completed so far."""
    return int(sh(lab, VM, f"wc -l < /run/faults/{tag}").strip() or 0)


def longest_gap(lab: Lab, job: str, tag: str = "probe") -> float:
    lab.exec(VM, f"touch /run/faults/{tag}.stop")
    lab.wait(VM, job, timeout=120)
    stamps = [float(t) for t in lab.exec(VM, f"cat /run/faults/{tag}").output.split()]
    return max((b - a for a, b in itertools.pairwise(stamps)), default=0.0)


def replicas(kube: Any, vid: str) -> dict[tuple[int, int], bool]:
    found = (kube.get(API, "Volume", vid) or {}).get("status") or {}
    return {(r["index"], r["replica"]): r["inSync"] for r in found.get("replicas") or []}


def in_sync_condition(kube: Any, vid: str) -> dict[str, Any]:
    found = (kube.get(API, "Volume", vid) or {}).get("status") or {}
    return next((c for c in found.get("conditions") or [] if c["type"] == mirrors.CONDITION), {})


def data_checksum(lab: Lab, vm: str, vid: str, replica: int) -> str:
    lv = naming.lv_device(naming.pool_volume_group(POOL), naming.segment_lv(vid, 0, replica))
    skip = mirrors.DATA_OFFSET >> 20
    out = sh(lab, vm, f"dd if={lv} bs=1M skip={skip} count={CHECKSUM_MIB} 2>/dev/null"
                      " | sha256sum")  # fmt: skip
    return out.split()[0]


def test_a_mirror_loses_a_storage_node_without_losing_a_write_then_resyncs(
    lab: Lab, agents: LocalCluster, driver: Driver, scenario: Scenario
) -> None:
    kube = agents.kube
    staged = stage(driver, "mirror-faults", 96, replicas="2")
    vid = staged.volume.volume_id
    spec = (kube.get(API, "Volume", vid) or {})["spec"]
    where = {s["replica"]: s["node"] for s in spec["segments"]}
    assert sorted(where.values()) == sorted(node_name(n.name) for n in NODES)
    # Replica 1's node is lost; replica 0's carries on.
    lost_replica = 1
    lost = next(n for n in NODES if node_name(n.name) == where[lost_replica])
    kept = next(n for n in NODES if n is not lost)
    logs = lambda: (f"{node_log(lab, VM)}\n{controller_log(lab)}\n"  # noqa: E731
                    f"{agent_log(lab, lost.name)}")  # fmt: skip

    loop = VerifyLoop(lab, staged.device, "mirror")
    probe = start_probe(lab, staged.device)
    assert processes.wait_until(lambda: loop.ok_after(1), 600), loop.passes()

    lab.kill(lost.name)
    killed_at = time.monotonic()
    behind = processes.wait_until(lambda: replicas(kube, vid).get((0, lost_replica)) is False, 180)
    assert behind, f"{replicas(kube, vid)}\n{logs()}"
    condition = in_sync_condition(kube, vid)
    assert condition["status"] == "False" and node_name(lost.name) in condition["message"]
    # The node plugin logs the window just after its write returns: the record can be
    # seen a moment before the line is.
    assert processes.wait_until(lambda: recorded_after(lab) is not None, 60), node_log(lab, VM)
    window = recorded_after(lab) or 0.0
    done_before = len(loop.passes())
    assert processes.wait_until(lambda: loop.ok_after(done_before + 2), 900), loop.passes()
    degraded_for = time.monotonic() - killed_at

    restart_storage(lab, lost)
    resynced = processes.wait_until(
        lambda: (
            replicas(kube, vid) == {(0, 0): True, (0, 1): True}
            and in_sync_condition(kube, vid).get("status") == "True"
        ),
        900,
    )
    assert resynced, f"{replicas(kube, vid)} {in_sync_condition(kube, vid)}\n{logs()}"
    stall = longest_gap(lab, probe)
    passes = loop.stop()
    failed = [p for p in passes if not p.endswith(" ok")]
    assert not failed, "\n".join(passes)
    assert len(passes) >= done_before + 2
    detail = sh(lab, VM, f"mdadm --detail {mirror_path(vid)}")
    assert "Active Devices : 2" in detail and "clean" in detail, detail

    unstage_only(driver, staged)
    sums = {vm.name: data_checksum(lab, vm.name, vid, r) for r, vm in
            ((lost_replica, lost), (1 - lost_replica, kept))}  # fmt: skip
    assert len(set(sums.values())) == 1, sums
    delete(driver, staged)
    scenario.done(
        f"mirror under fio --verify: {lost.name} killed, {len(passes)} passes, 0 verify "
        f"errors; writes stalled {stall:.1f} s at most; degraded {degraded_for:.0f} s, "
        f"the degrade in the Volume's status {window:.3f} s after md's notice; resynced; "
        f"replicas identical ({next(iter(sums.values()))[:12]})"
    )


def recorded_after(lab: Lab) -> float | None:
    """How long after the monitor saw md fail a member its record was written (the
    node plugin's log says so for each degrade; the last one)."""
    found = re.findall(r"recorded in the Volume's status ([0-9.]+) s after", node_log(lab, VM))
    return float(found[-1]) if found else None


def write_random(lab: Lab, device: str, tag: str, mib: int = 8) -> str:
    """Random bytes written to the device's start and flushed (acknowledged); their sha256."""
    sh(lab, VM, f"dd if=/dev/urandom of=/run/faults/{tag} bs=1M count={mib} 2>/dev/null && "
                f"dd if=/run/faults/{tag} of={device} bs=1M oflag=direct conv=fsync"
                " 2>/dev/null")  # fmt: skip
    return sh(lab, VM, f"sha256sum < /run/faults/{tag}").split()[0]


def read_back(lab: Lab, device: str, mib: int = 8) -> str:
    return sh(lab, VM, f"dd if={device} bs=1M count={mib} iflag=direct 2>/dev/null | sha256sum"
              ).split()[0]  # fmt: skip


def test_a_mirror_whose_fresher_leg_is_away_is_never_assembled_from_the_stale_one(
    lab: Lab, agents: LocalCluster, driver: Driver, scenario: Scenario
) -> None:
    """Leg A lost, writes acknowledged on leg B, the volume detached, leg B lost, leg A
    back: NodeStage is UNAVAILABLE (an array over A alone would serve the older bytes as
    if current); once B is back the last acknowledged write reads back. A leg is lost by
    cutting its storage VM's fabric link (no reboot: the scenario costs no boot)."""
    kube = agents.kube
    staged = stage(driver, "mirror-rollback", 32, replicas="2")
    vid = staged.volume.volume_id
    spec = (kube.get(API, "Volume", vid) or {})["spec"]
    where = {s["replica"]: s["node"] for s in spec["segments"]}
    first = next(n for n in NODES if node_name(n.name) == where[1])  # leg A: lost first
    second = next(n for n in NODES if n is not first)  # leg B: has the last writes
    write_random(lab, staged.device, "before")
    try:
        lab.cut_link(first.name)
        assert processes.wait_until(lambda: replicas(kube, vid).get((0, 1)) is False, 180), (
            f"{replicas(kube, vid)}\n{node_log(lab, VM)}"
        )
        last = write_random(lab, staged.device, "after")  # acknowledged by leg B alone
        unstage_only(driver, staged)
        lab.cut_link(second.name)
        lab.restore_link(first.name)
        with pytest.raises(grpc.RpcError) as refused:
            stage_on_node(driver, staged)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        details = refused.value.details() or ""
        assert f"replica 1 on {node_name(first.name)} is out of sync" in details, details
        arrays = sh(lab, VM, "cat /proc/mdstat")
        made = sh(lab, VM, "ls /dev/md 2>/dev/null || true")
        assert mirrors.md_name(vid, 0) not in made, arrays
    finally:
        for spec_ in (first, second):  # nothing cut for the next scenario
            lab.restore_link(spec_.name)
    stage_on_node(driver, staged)
    assert read_back(lab, staged.device) == last
    healed = processes.wait_until(lambda: replicas(kube, vid) == {(0, 0): True, (0, 1): True}, 300)
    assert healed, f"{replicas(kube, vid)}\n{node_log(lab, VM)}"
    unstage(driver, staged)
    scenario.done(
        f"mirror: {first.name}'s link cut, 8 MiB written, {second.name}'s cut, "
        f"{first.name}'s back: NodeStage UNAVAILABLE (no array from the stale leg); "
        f"{second.name}'s back: the last write read back ({last[:12]}), leg A resynced"
    )


def first_pass_done(spec: VmSpec) -> bool:
    """The (new) agent answers on its metrics port and has finished a pass."""
    try:
        return agent_passes(spec)["finished"] >= 1
    except OSError:  # not listening yet
        return False


def mirror_path(vid: str) -> str:
    return f"/dev/md/{mirrors.md_name(vid, 0)}"


def unstage_only(driver: Driver, staged: Staged) -> None:
    vid = staged.volume.volume_id
    driver.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=staged.device), timeout=300
    )
    driver.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=f"/run/faults/{vid}/staging"
        ),
        timeout=300,
    )


def delete(driver: Driver, staged: Staged) -> None:
    vid = staged.volume.volume_id
    driver.controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=host_nqn(VM)),
        timeout=600,
    )
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=600)


def test_a_storage_node_away_for_minutes_stalls_io_that_resumes_on_its_return(
    lab: Lab, agents: LocalCluster, driver: Driver, scenario: Scenario
) -> None:
    """A storage VM powered off for OUTAGE_SECONDS under fio --verify, with the default
    class: a single-segment and a striped volume stall (I/O queued, not failed) and resume
    within seconds of the node's return, with zero verify errors and no NodeUnstage or
    NodeStage in between. A class that chose to fail fast (keep-alive 5 s, fastIoFailTmo
    5 s) fails a write within those, never after the kernel's 600 s; its controller, given
    up after ctrlLossTmo, is connected again by the node plugin and its stripe reloaded."""
    kube = agents.kube
    single = stage(driver, "outage-single", 80)  # room for the probe at 64 MiB
    node = (kube.get(API, "Volume", single.volume.volume_id) or {})["spec"]["segments"][0]
    lost = next(n for n in NODES if node_name(n.name) == node["node"])
    striped = stage(driver, "outage-striped", 80, stripeWidth="2")  # on both storage VMs
    fast = stage(driver, "outage-fast", 32, stripeWidth="2", keepAliveTmo="5",
                 fastIoFailTmo="5", ctrlLossTmo="60")  # fmt: skip
    volumes = {"single": single, "striped": striped}
    loops = {tag: VerifyLoop(lab, v.device, tag) for tag, v in volumes.items()}
    probes = {tag: start_probe(lab, v.device, f"{tag}.probe") for tag, v in volumes.items()}
    for loop in loops.values():
        assert processes.wait_until(lambda loop=loop: loop.ok_after(1), 600), loop.passes()
    for tag in volumes:
        assert processes.wait_until(lambda tag=tag: probe_writes(lab, f"{tag}.probe") > 0, 60)
    stages_before = stage_calls(lab)
    fast_controllers = controllers_of(lab, fast.volume.volume_id)

    lab.kill(lost.name)
    killed = time.monotonic()
    # A write spanning both stripes of the fail-fast volume, issued once the node is gone.
    out = lab.exec(VM, (
        f"t0=$(date +%s.%N); dd if=/dev/zero of={fast.device} bs=1M count=4 oflag=direct"
        f" 2>&1; rc=$?; t1=$(date +%s.%N); echo \"rc=$rc took $t0 $t1\""
    ), timeout=300).output  # fmt: skip
    rc, _, t0, t1 = next(x for x in out.splitlines() if x.startswith("rc=")).split()
    assert rc != "rc=0", out
    failed_after = float(t1) - float(t0)
    # The outage itself: the node stays off for its length (a fault's duration, not a wait
    # for some state). The default-class I/O queues meanwhile.
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - killed)))
    done = {tag: probe_writes(lab, f"{tag}.probe") for tag in volumes}
    restart_storage(lab, lost)
    assert processes.wait_until(lambda: first_pass_done(lost), 300), agent_log(lab, lost.name)
    exported = time.monotonic()
    resumed = {}
    for tag in volumes:
        more = lambda tag=tag: probe_writes(lab, f"{tag}.probe") > done[tag]  # noqa: E731
        assert processes.wait_until(more, 300), f"{tag}: no write since\n{node_log(lab, VM)}"
        resumed[tag] = time.monotonic() - exported
    # The fail-fast class's controller was given up after its ctrlLossTmo (60 s, the node
    # was away for longer): the node plugin's monitor connects the segment again and
    # reloads the stripe, and the volume takes writes again with no NodeStage.
    fast_vid = fast.volume.volume_id
    writes = lambda: sh(lab, VM, DIRECT_WRITE.format(dev=fast.device)).strip() == "0"  # noqa: E731
    assert processes.wait_until(writes, 300), node_log(lab, VM)
    restriped = time.monotonic() - exported
    # A new controller (the kernel's reconnects keep theirs), made by the node plugin's
    # monitor (the log reaches the host through the share's writeback: awaited).
    now = controllers_of(lab, fast_vid)
    assert len(now) == 2 and now != fast_controllers, (fast_controllers, now)
    said = f"volume {fast_vid}: its segments are connected again"
    assert processes.wait_until(
        lambda: said in (lab.workdir / f"csi-node-{VM}.log").read_text(errors="replace"), 120
    ), node_log(lab, VM)
    for tag, loop in loops.items():
        count = len(loop.passes())
        assert processes.wait_until(lambda loop=loop, c=count: loop.ok_after(c + 1), 600), tag
    stalls = {tag: longest_gap(lab, probes[tag], f"{tag}.probe") for tag in volumes}
    for tag, loop in loops.items():
        passes = loop.stop()
        assert not [p for p in passes if not p.endswith(" ok")], "\n".join(passes)
        # The I/O was queued through the whole outage, not failed and retried.
        assert stalls[tag] >= OUTAGE_SECONDS * 0.9, (tag, stalls[tag])
    assert stage_calls(lab) == stages_before
    for staged in (single, striped, fast):
        unstage(driver, staged)
    scenario.done(
        f"{lost.name} powered off {OUTAGE_SECONDS} s under fio --verify: single-segment and "
        f"striped volumes stalled {stalls['single']:.0f} s and {stalls['striped']:.0f} s at "
        f"most, 0 verify errors, writes again {resumed['single']:.1f} s and "
        f"{resumed['striped']:.1f} s after its agent's first pass, no NodeStage between; "
        f"the fail-fast class failed a write after {failed_after:.1f} s, its controller "
        f"given up after ctrlLossTmo 60 s, then connected again and its stripe reloaded by "
        f"the node plugin: writes again {restriped:.1f} s after the agent's first pass"
    )


def test_restarting_the_node_plugin_and_agents_under_fio_verify(
    lab: Lab, agents: LocalCluster, driver: Driver, scenario: Scenario
) -> None:
    staged = stage(driver, "restarts-faults", 64, stripeWidth="2")
    loop = VerifyLoop(lab, staged.device, "restarts")
    assert processes.wait_until(lambda: loop.ok_after(1), 600), loop.passes()
    start_node_plugin(lab, agents, VM)  # a new process in place of the running one
    for spec in NODES:
        stop_agent(lab, spec)
        start_agent(lab, spec)
    # Two more passes once each new agent has made its first pass over the node: the
    # restarts' whole effect on the exports lies inside the verified I/O.
    for spec in NODES:
        assert processes.wait_until(lambda s=spec: first_pass_done(s), 300), agent_log(
            lab, spec.name
        )
    done = len(loop.passes())
    assert processes.wait_until(lambda: loop.ok_after(done + 2), 900), loop.passes()
    passes = loop.stop()
    assert not [p for p in passes if not p.endswith(" ok")], "\n".join(passes)
    unstage(driver, staged)
    scenario.done(f"node plugin and both agents restarted under fio --verify: "
                  f"{len(passes)} passes, 0 errors")  # fmt: skip
