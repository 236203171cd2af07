"""Elastic bandwidth: does each storage node added add its bandwidth?

Three storage VMs whose drives QEMU throttles to the same rate, and one GPU VM. First the
GPU VM's unthrottled fabric ceiling is measured (sequential reads over NVMe/TCP from a
null_blk device exported by hand: no drive in the way, so the emulated CPUs are the
limit). The scaling is reported only if three throttled drives together stay below a
quarter of that ceiling (each drive below a twelfth): then the fabric is not what limits
the striped reads, the drives are. Then striped volumes of width 1, 2 and 3 (over 1, 2 and
3 storage VMs) are written in full and read sequentially; width 1 is the baseline."""

from __future__ import annotations

from pathlib import Path

from bench.node_lab import NodeLab, host_args, node_lab
from bench.report import Result
from flashmesh.lab.progress import say
from flashmesh.lab.vm import Drive, VmSpec

DRIVE_BPS = 2 << 20  # 2 MiB/s per drive: three stay below a quarter of a ~45 MiB/s ceiling
STORAGE = tuple(
    VmSpec(f"storage-{i}", 1 + i, drives=(Drive(1024, bps=DRIVE_BPS),), memory_mib=384)
    for i in range(3)
)
GPU = VmSpec("gpu-0", 5, memory_mib=512)
SEGMENT_MIB = 16  # each segment is read once in full: 8 s at the drive's rate
RUNTIME_S = 20
CEILING_NQN = "nqn.2026-11.dev.bench:ceiling"


def seq_read(device: str, size_mib: int) -> str:
    return (
        f"--name=seq --filename={device} --direct=1 --ioengine=libaio --rw=read --bs=1M"
        f" --iodepth=16 --size={size_mib}M"
    )


def ceiling(lab: NodeLab) -> float:
    """MiB/s the GPU VM reads over NVMe/TCP from a device that costs nothing."""
    storage, gpu = STORAGE[0], GPU.name
    lab.sh(storage.name, f"modprobe null_blk nr_devices=1 gb=4\n"
                         f"nvmet_subsystem {CEILING_NQN} /dev/nullb0 1\n"
                         f"nvmet_port 30 tcp {storage.address(0)} 4440 {CEILING_NQN}")  # fmt: skip
    try:
        device = lab.sh(gpu, "modprobe nvme-tcp\n"
                             f"nvme connect -t tcp -a {storage.address(0)} -s 4440"
                             f" -n {CEILING_NQN} {host_args(gpu)} >/dev/null\n"
                             f"nvme_device {CEILING_NQN} 60").split()[-1]  # fmt: skip
        try:
            job = lab.fio_json(gpu, f"{seq_read(device, 4096)} --runtime={RUNTIME_S} --time_based")
        finally:
            lab.sh(gpu, f"nvme disconnect -n {CEILING_NQN} >/dev/null")
    finally:
        lab.sh(storage.name, "nvmet_clear nqn.2026-11.dev.bench:\nrmmod null_blk || true")
    return float(job["jobs"][0]["read"]["bw_bytes"]) / 2**20


def striped_read(lab: NodeLab, width: int) -> float:
    """MiB/s of one sequential read through a volume striped over `width` storage VMs."""
    size = SEGMENT_MIB * width
    attached = lab.create(f"bench-width-{width}", size, block=True, width=width)
    lab.stage(attached)
    device = lab.publish(attached)
    say(f"width {width}: writing {size} MiB, then reading it back")
    lab.sh(GPU.name, f"dd if=/dev/zero of={device} bs=1M count={size} oflag=direct", 1800)
    job = lab.fio_json(GPU.name, seq_read(device, size), 1800)
    lab.unpublish(attached)
    lab.unstage(attached)
    return float(job["jobs"][0]["read"]["bw_bytes"]) / 2**20


def run(workdir: Path) -> Result:
    result = Result("bandwidth", "Elastic bandwidth: striped sequential reads",
                    baseline="width 1 (one storage VM)")  # fmt: skip
    with node_lab(workdir, STORAGE, GPU) as lab:
        say("measuring the GPU VM's fabric ceiling (null_blk over NVMe/TCP)")
        top = ceiling(lab)
        drive = DRIVE_BPS / 2**20
        result.add("fabric ceiling of the GPU VM", "MiB/s", top)
        result.add("each drive's throttle", "MiB/s", drive)
        if 3 * drive >= top / 4:
            result.notes.append(
                f"Not reported: three drives ({3 * drive:.0f} MiB/s) reach a quarter of the"
                f" fabric ceiling ({top:.1f} MiB/s), so the fabric, not the drives, could"
                " limit the wider stripes."
            )
            return result
        widths = {w: striped_read(lab, w) for w in (1, 2, 3)}
    for w, bw in widths.items():
        result.add(f"width {w} over {w} storage VM(s)", "MiB/s", bw, widths[1], better="higher")
    result.notes += [
        f"Each storage VM's drive is throttled by QEMU to {drive:.0f} MiB/s; each volume is"
        f" {SEGMENT_MIB} MiB per segment, written in full, then read once sequentially"
        " (1 MiB blocks, queue depth 16, O_DIRECT) through its device-mapper stripe.",
        f"Three drives together stay below a quarter of the GPU VM's fabric ceiling"
        f" ({top:.1f} MiB/s), so the ratios show the drives adding up.",
    ]
    return result
