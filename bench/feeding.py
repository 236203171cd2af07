"""Feeding accelerators: how many emulated accelerators one GPU VM keeps at >= 90%
utilisation reading a dataset of many small files (bench/loader.py, MLPerf-Storage style),
from a FlashMesh volume over NVMe/TCP against the same dataset on a local drive of the
same VM (the baseline). Page caches are dropped before every run, and no sample is read
twice in a run, so every read reaches storage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.loader import READERS, largest_kept
from bench.node_lab import STORAGE, NodeLab, node_lab
from bench.report import Result
from flashmesh.lab.progress import say
from flashmesh.lab.vm import Drive, VmSpec

GPU = VmSpec("gpu-0", 3, memory_mib=768, drives=(Drive(1024),))
LOADER = Path(__file__).resolve().parent / "loader.py"
PYTHON = sys.executable
COUNTS = (1, 2, 4, 8, 16, 32)
SAMPLE_KIB = 32
BATCH = 8
COMPUTE_MS = 40.0
BATCHES = 64
LOCAL = "/run/bench/local"


def loader(lab: NodeLab, command: str) -> str:
    return lab.sh(GPU.name, f"{PYTHON} {LOADER} {command}", 1800)


def sweep(lab: NodeLab, data: str, label: str) -> dict[int, float]:
    """Utilisation for each accelerator count, until one falls below 90%."""
    runs: dict[int, float] = {}
    for n in COUNTS:
        out = lab.sh(GPU.name, f"sync; echo 3 > /proc/sys/vm/drop_caches\n"
                               f"{PYTHON} {LOADER} run {data} --accelerators {n} --batch {BATCH}"
                               f" --compute-ms {COMPUTE_MS} --batches {BATCHES}", 1800)  # fmt: skip
        runs[n] = float(json.loads(out.strip().splitlines()[-1])["utilisation"])
        say(f"{label}: {n} accelerator(s) at {runs[n]:.0%} utilisation")
        if runs[n] < 0.9:
            break
    return runs


def run(workdir: Path) -> Result:
    result = Result("feeding", "Feeding accelerators: small-file loader",
                    baseline="a local drive in the same VM")  # fmt: skip
    samples = max(COUNTS) * BATCH * BATCHES
    with node_lab(workdir, (STORAGE,), GPU) as lab:
        attached = lab.create("bench-dataset", 1024, block=False)
        lab.stage(attached)
        mounted = lab.publish(attached)
        serial = lab.lab.drive_serial(GPU.name, 0)
        lab.sh(GPU.name, f"dev=$(drive_by_serial {serial})\nmkfs.ext4 -q -F $dev\n"
                         f"mkdir -p {LOCAL}\nmount $dev {LOCAL}")  # fmt: skip
        try:
            for data, label in ((mounted, "FlashMesh"), (LOCAL, "local drive")):
                say(f"{label}: writing {samples} samples of {SAMPLE_KIB} KiB")
                loader(lab, f"prepare {data}/samples --samples {samples}"
                            f" --sample-kib {SAMPLE_KIB}")  # fmt: skip
            fm = sweep(lab, f"{mounted}/samples", "FlashMesh")
            local = sweep(lab, f"{LOCAL}/samples", "local drive")
        finally:
            lab.sh(GPU.name, f"umount {LOCAL} || true")
        lab.unpublish(attached)
        lab.unstage(attached)
    result.add("accelerators kept at >= 90% utilisation", "count", largest_kept(fm),
               largest_kept(local), better="higher")  # fmt: skip
    result.notes += [
        f"{samples} samples of {SAMPLE_KIB} KiB; each accelerator takes batches of {BATCH},"
        f" computes {COMPUTE_MS:.0f} ms per batch, {BATCHES} batches per run, with two"
        f" batches read ahead by {READERS} threads; the first batch (filling the pipeline)"
        " is a warm-up step, not counted; counts tried: " + ", ".join(map(str, COUNTS)) + ".",
        "FlashMesh utilisation by count: "
        + ", ".join(f"{n}: {au:.0%}" for n, au in fm.items())
        + "; local drive: "
        + ", ".join(f"{n}: {au:.0%}" for n, au in local.items())
        + ".",
        "The loader is Python in a software-emulated VM: its own CPU time limits both"
        " sides, so the ratio is the figure to read.",
    ]
    return result
