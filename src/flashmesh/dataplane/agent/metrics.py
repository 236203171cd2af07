"""The storage agent's Prometheus series: its passes' durations, the segments it exports
and their readiness, and its volume group's size and use."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PASSES = Counter(
    "flashmesh_agent_passes_total",
    "Reconcile passes of the storage agent, by what started them: start, event (a watched "
    "change concerning the node), retry (work left undone) or resync (nothing changed for "
    "the resync period)",
    ["trigger"],
)
STATUS_WRITES = Counter(
    "flashmesh_agent_status_writes_total",
    "Status writes of the storage agent, by kind (only what changed is written)",
    ["kind"],
)

PASS_SECONDS = Histogram(
    "flashmesh_agent_reconcile_duration_seconds",
    "One reconcile pass of the storage agent",
    ["outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
SEGMENT_EXPORTS = Gauge(
    "flashmesh_agent_segment_exports",
    "Segments of volumes this node exports (NVMe subsystems), by readiness",
    ["ready"],
)
THIN_POOL_BYTES = Gauge("flashmesh_agent_thin_pool_size_bytes", "The node's thin pool size")
THIN_POOL_USED = Gauge(
    "flashmesh_agent_thin_pool_used_bytes", "Bytes of the node's thin pool holding data"
)


def record_exports(ready: int, not_ready: int) -> None:
    SEGMENT_EXPORTS.labels("true").set(ready)
    SEGMENT_EXPORTS.labels("false").set(not_ready)
