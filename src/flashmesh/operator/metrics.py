"""The operator's Prometheus series: each pool's capacity, use and nodes, and how long
reconciles take."""

from __future__ import annotations

import contextlib

from prometheus_client import Gauge, Histogram

from flashmesh.core.resources import StoragePoolStatus
from flashmesh.core.units import parse_bytes
from flashmesh.core.workloads import PHASES

POOL_CAPACITY = Gauge(
    "flashmesh_pool_capacity_bytes", "Thin pool bytes summed over a pool's nodes", ["pool"]
)
POOL_USED = Gauge(
    "flashmesh_pool_used_bytes", "Bytes promised to volumes and snapshots in a pool", ["pool"]
)
POOL_NODES = Gauge(
    "flashmesh_pool_nodes", "A pool's storage nodes, by readiness", ["pool", "ready"]
)
VOLUMES = Gauge("flashmesh_volumes", "A pool's volumes, by phase", ["pool", "phase"])
POOL_DEGRADED = Gauge("flashmesh_pool_degraded", "1 while a pool is Degraded", ["pool"])
WORKLOADS = Gauge(
    "flashmesh_trainingworkload_phase",
    "1 for a TrainingWorkload's current phase",
    ["namespace", "name", "phase"],
)
RECONCILE_SECONDS = Histogram(
    "flashmesh_operator_reconcile_duration_seconds",
    "Time to reconcile one object",
    ["kind", "outcome"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def record_pool(name: str, status: StoragePoolStatus, volume_phases: dict[str, int]) -> None:
    for phase, count in volume_phases.items():
        VOLUMES.labels(name, phase).set(count)
    POOL_CAPACITY.labels(name).set(parse_bytes(status.capacity or 0))
    POOL_USED.labels(name).set(parse_bytes(status.used or 0))
    ready = status.nodes_ready or 0
    POOL_NODES.labels(name, "true").set(ready)
    POOL_NODES.labels(name, "false").set((status.nodes_total or 0) - ready)
    POOL_DEGRADED.labels(name).set(1 if status.phase == "Degraded" else 0)


def forget_pool(name: str) -> None:
    """A deleted pool's series go (a series never recorded is no error)."""
    series: list[tuple[Gauge, tuple[str, ...]]] = [
        *((g, (name,)) for g in (POOL_CAPACITY, POOL_USED, POOL_DEGRADED)),
        *((POOL_NODES, (name, r)) for r in ("true", "false")),
        *((VOLUMES, (name, p)) for p in ("Pending", "Ready", "Deleting")),
    ]
    for gauge, labels in series:
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)


def record_workload(namespace: str, name: str, phase: str) -> None:
    for each in PHASES:
        WORKLOADS.labels(namespace, name, each).set(1 if each == phase else 0)
