"""What several benchmarks need: a control plane with the CRDs, process memory, metrics."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from flashmesh.core import resources
from flashmesh.lab import processes
from flashmesh.lab.binaries import locate_csi
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.crds import install_crds
from flashmesh.lab.progress import say

PYTHON = sys.executable
API = resources.API_VERSION


@contextmanager
def control_plane(workdir: Path) -> Iterator[LocalCluster]:
    """A fresh local control plane with FlashMesh's CRDs and the snapshot CRDs; removed after."""
    cluster = LocalCluster(workdir / "cluster")
    cluster.start()
    try:
        install_crds(cluster)
        for crd in locate_csi().crd_files():
            cluster.kubectl("apply", "--server-side", "-f", str(crd))
        yield cluster
    finally:
        cluster.stop()


@contextmanager
def flashmesh_process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`flashmesh ARGS` as its own process, stopped when the block ends."""
    proc = processes.spawn([PYTHON, "-m", "flashmesh.cli", *args], log, die_with_parent=True)
    try:
        yield proc
    finally:
        processes.end(proc)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"process {pid} has no VmRSS (exited?)")


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample on http://127.0.0.1:PORT/metrics, keyed by name and labels; {} when down."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:  # fmt: skip
    """The sum of a series' samples whose labels include the given ones."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def lab_pool(cluster: LocalCluster, name: str, nodes: int, min_size: str = "900Mi") -> None:
    """A StoragePool over the lab's storage VMs' drives (NVMe/TCP), waited for until all
    `nodes` of them serve it."""
    kube = cluster.kube
    kube.create({
        "apiVersion": API, "kind": "StoragePool", "metadata": {"name": name},
        "spec": {"nodeSelector": {"matchLabels": {"flashmesh.dev/storage": "true"}},
                 "drives": {"pathPatterns": ["/dev/nvme*n1"], "minSize": min_size},
                 "transports": ["tcp"]},
    })  # fmt: skip

    def ready() -> bool:
        found = kube.get(API, "StoragePool", name) or {}
        return (found.get("status") or {}).get("nodesReady") == nodes

    timed_wait(f"the pool serving on {nodes} storage VM(s)", ready, 900)


def timed_wait(what: str, condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until condition held; a RuntimeError naming `what` if it never did."""
    begin = time.monotonic()
    if not processes.wait_until(condition, timeout, interval=0.1):
        raise RuntimeError(f"{what}: not within {timeout:.0f} s")
    took = time.monotonic() - begin
    say(f"{what} ({took:.1f} s)")
    return took
