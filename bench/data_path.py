"""Data path: fio 4 KiB random reads at queue depth 1 (latency) and 32 (IOPS) on a
FlashMesh block volume, against raw nvme-tcp to the same logical volume from the same GPU
VM (`nvme connect` by hand, no FlashMesh in the way), and against the logical volume read
locally in its storage VM (no fabric at all).

A single-segment volume is the segment's own NVMe namespace (no device-mapper layer), so
FlashMesh against raw nvme-tcp should be even; the local read shows what the fabric
costs on these software-emulated CPUs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.node_lab import GPU, STORAGE, NodeLab, host_args, node_lab
from bench.report import Result
from flashmesh.lab.progress import say

SIZE_MIB = 256
RUNTIME_S = 20


def fio_args(device: str, depth: int) -> str:
    return (
        f"--name=rr --filename={device} --direct=1 --ioengine=libaio --rw=randread --bs=4k"
        f" --iodepth={depth} --size={SIZE_MIB}M --runtime={RUNTIME_S} --time_based"
        " --randrepeat=0 --norandommap"
    )


def measure(lab: NodeLab, vm: str, device: str, label: str) -> tuple[float, float]:
    """(QD1 median latency in microseconds, QD32 IOPS)."""
    say(f"fio on {label}: QD1 then QD32, {RUNTIME_S} s each")
    qd1: dict[str, Any] = lab.fio_json(vm, fio_args(device, 1))["jobs"][0]["read"]
    qd32: dict[str, Any] = lab.fio_json(vm, fio_args(device, 32))["jobs"][0]["read"]
    latency_us = float(qd1["clat_ns"]["percentile"]["50.000000"]) / 1000
    return latency_us, float(qd32["iops"])


def run(workdir: Path) -> Result:
    result = Result("data-path", "Data path: 4 KiB random reads",
                    baseline="raw nvme-tcp to the same LV")  # fmt: skip
    with node_lab(workdir) as lab:
        attached = lab.create("bench-data", SIZE_MIB, block=True)
        lab.stage(attached)
        device = lab.publish(attached)
        # Written once, so reads hit allocated blocks (a thin volume reads holes as zeros).
        lab.sh(GPU.name, f"dd if=/dev/zero of={device} bs=1M count={SIZE_MIB} oflag=direct")
        # Read once in full, so the thin pool's mappings are cached on the storage VM before
        # any measured run (otherwise the first target measured pays for them).
        lab.sh(GPU.name, f"dd if={device} of=/dev/null bs=1M iflag=direct")
        fm = measure(lab, GPU.name, device, "the FlashMesh volume")
        lab.unpublish(attached)
        lab.unstage(attached)

        nqn, address, port = lab.segment(attached)
        raw_device = lab.sh(GPU.name, "modprobe nvme-tcp\n"
                                      f"nvme connect -t tcp -a {address} -s {port} -n {nqn}"
                                      f" {host_args(GPU.name)} >/dev/null\n"
                                      f"nvme_device {nqn} 60").split()[-1]  # fmt: skip
        try:
            raw = measure(lab, GPU.name, raw_device, "raw nvme-tcp")
        finally:
            lab.sh(GPU.name, f"nvme disconnect -n {nqn} >/dev/null")
        local = measure(lab, STORAGE.name, lab.local_device(attached), "the LV, locally")

    result.add("QD1 read latency, p50", "us", fm[0], raw[0])
    result.add("QD32 read IOPS", "IOPS", fm[1], raw[1], better="higher")
    result.add("QD1 read latency, p50, vs the LV read locally", "us", fm[0], local[0])
    result.add("QD32 read IOPS, vs the LV read locally", "IOPS", fm[1], local[1],
               better="higher")  # fmt: skip
    result.notes.append(
        "FlashMesh and raw nvme-tcp are the same kernel path for one segment (the namespace"
        " itself, no device-mapper layer): their ratio shows the emulated machine's"
        " run-to-run noise (0.7x to 1.35x across runs here)."
    )
    result.notes.append(
        f"fio randread, 4 KiB, {RUNTIME_S} s per run, O_DIRECT, libaio, over a {SIZE_MIB} MiB"
        " single-segment volume written in full and read once before the measured runs."
    )
    return result
