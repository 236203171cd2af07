"""Attach: NodeStageVolume (connect over NVMe/TCP, find the device, mount its filesystem)
against the same steps written by hand (`nvme connect`, wait for the block device,
`mount`) for the same segment from the same GPU VM.

NodeStage is timed by its caller, across the lab bridge, as the kubelet would see it; the
hand-written steps are timed inside the VM, so they carry no call overhead at all. The first
NodeStage makes the filesystem and is not counted."""

from __future__ import annotations

from pathlib import Path

from bench.node_lab import GPU, host_args, node_lab
from bench.report import Result, percentile
from flashmesh.lab.progress import say

ROUNDS = 10
MOUNT = "/run/bench/by-hand"


def by_hand(nqn: str, address: str, port: str) -> str:
    """A shell loop timing connect + device + mount ROUNDS times; prints one line each."""
    return f"""
modprobe nvme-tcp
mkdir -p {MOUNT}
for i in $(seq {ROUNDS}); do
  t0=$(date +%s.%N)
  nvme connect -t tcp -a {address} -s {port} -n {nqn} {host_args(GPU.name)} >/dev/null
  dev=$(nvme_device {nqn} 60)
  mount -t ext4 "$dev" {MOUNT}
  t1=$(date +%s.%N)
  echo "took $t0 $t1"
  umount {MOUNT}
  nvme disconnect -n {nqn} >/dev/null
done"""


def run(workdir: Path) -> Result:
    result = Result("attach", "Attach: NodeStageVolume", baseline="nvme connect + mount by hand")
    with node_lab(workdir) as lab:
        attached = lab.create("bench-attach", 64, block=False)
        lab.stage(attached)  # makes the filesystem
        lab.unstage(attached)
        say(f"NodeStage/NodeUnstage x{ROUNDS}")
        staged = []
        for _ in range(ROUNDS):
            staged.append(lab.stage(attached))
            lab.unstage(attached)
        say(f"nvme connect + mount by hand x{ROUNDS}")
        out = lab.sh(GPU.name, by_hand(*lab.segment(attached)))
        hand = [
            float(t1) - float(t0)
            for line in out.splitlines()
            if line.startswith("took ")
            for t0, t1 in [line.split()[1:3]]
        ]
        if len(hand) != ROUNDS:
            raise RuntimeError(f"the hand-written loop printed {len(hand)} timings:\n{out}")
    result.add("NodeStage, p50", "s", percentile(staged, 50), percentile(hand, 50))
    result.add("NodeStage, p95", "s", percentile(staged, 95), percentile(hand, 95))
    result.notes.append(
        f"{ROUNDS} rounds each on one 64 MiB single-segment volume (ext4); NodeUnstage and"
        " the hand-written umount + disconnect between rounds are not timed."
    )
    return result
