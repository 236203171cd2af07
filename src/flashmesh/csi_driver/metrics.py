"""The CSI driver's Prometheus series: every call's duration by method and status code,
and on a node, the state of every NVMe-oF path to a FlashMesh subsystem (read from sysfs
at each scrape, so it is never stale)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flashmesh.core import naming
from flashmesh.dataplane.initiator import sysfs

OPERATION_SECONDS = Histogram(
    "flashmesh_csi_operation_duration_seconds",
    "CSI calls, by method and gRPC status code",
    ["method", "code"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


class PathStates(Collector):
    """flashmesh_nvme_paths{subsystem, state}: how many controllers (paths) of each
    FlashMesh subsystem this node has, by their kernel state (live, connecting, ...)."""

    def __init__(self, root: Path = sysfs.SYSFS) -> None:
        self.root = root

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "flashmesh_nvme_paths",
            "NVMe-oF paths on this node, by state",
            labels=["subsystem", "state"],
        )
        for sub in sysfs.subsystems(self.root):
            if not naming.is_flashmesh_nqn(sub.nqn):
                continue
            for state, count in sorted(Counter(c.state for c in sub.controllers).items()):
                family.add_metric([sub.nqn, state], count)
        yield family


_registered = False


def watch_paths() -> None:
    """Registers the path collector once (the node service calls it at start)."""
    global _registered
    if not _registered:
        REGISTRY.register(PathStates())
        _registered = True
