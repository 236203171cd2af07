"""The StorageNode's status, built from what one pass found: drives, volume group and thin
pool usage, endpoints, RDMA ports, host NQN and conditions. Written only when it differs
from the status the API server holds (the Lease is the heartbeat; lastHeartbeatTime says
when the status last changed)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flashmesh.core import resources, serde
from flashmesh.core.drives import BlockDevice
from flashmesh.core.resources import Condition, Endpoint
from flashmesh.core.units import format_bytes, parse_bytes
from flashmesh.dataplane import rdma
from flashmesh.dataplane.agent import metrics
from flashmesh.dataplane.lvm import THIN_POOL, Lvm
from flashmesh.kube import Kube

API = resources.API_VERSION


@dataclass
class NodeReport:
    devices: list[BlockDevice]
    selected: set[str]
    vg_name: str | None
    endpoints: list[Endpoint]
    ports: list[rdma.Port]
    conditions: list[Condition]
    host_nqn: str | None = None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def volume_group_status(lvm: Lvm, vg_name: str | None) -> resources.VolumeGroup | None:
    group = lvm.volume_group(vg_name) if vg_name else None
    if group is None:
        return None
    pool = lvm.logical_volume(group.name, THIN_POOL)
    thin = None
    free = group.free
    if pool is not None:
        thin = resources.ThinPool(
            THIN_POOL, format_bytes(pool.size), pool.data_percent, pool.metadata_percent
        )
        # Promised thin space counts as used: the pool never silently overcommits.
        free = max(pool.size - lvm.allocated(group.name), 0)
    return resources.VolumeGroup(group.name, format_bytes(group.size), format_bytes(free), thin)


def report_node(
    kube: Kube, node_obj: dict[str, Any], lvm: Lvm, report: NodeReport
) -> dict[str, Any] | None:
    """Writes the node's status if it differs from node_obj's; the object the write
    returned, or None when nothing was written."""
    drives = [
        resources.Drive(d.path, format_bytes(d.size), d.model, d.serial, d.path in report.selected)
        for d in report.devices
    ]
    volume_group = volume_group_status(lvm, report.vg_name)
    thin = volume_group.thin_pool if volume_group else None
    if thin is not None:
        size = parse_bytes(thin.size)
        metrics.THIN_POOL_BYTES.set(size)
        metrics.THIN_POOL_USED.set(size * (thin.data_percent or 0.0) / 100)
    # A refused drive is a warning (DrivesReady); the node serves from what it has.
    ready = volume_group is not None and volume_group.thin_pool is not None
    message = "serving" if ready else "no volume group yet: see DrivesReady"
    if not node_obj.get("spec", {}).get("pool"):
        message = "not in a StoragePool (spec.pool is empty)"
    conditions = [
        *report.conditions,
        Condition(
            "Ready", "True" if ready else "False", "Heartbeat" if ready else "NotReady", message
        ),
    ]
    now = _now()
    generation = node_obj["metadata"].get("generation")
    previous = {c["type"]: c for c in (node_obj.get("status") or {}).get("conditions") or []}
    for c in conditions:
        old = previous.get(c.type)
        same = old and old.get("status") == c.status
        c.last_transition_time = old.get("lastTransitionTime") if same and old else now
        c.observed_generation = generation
    status = resources.StorageNodeStatus(
        phase="Ready" if ready else "NotReady",
        host_nqn=report.host_nqn,
        drives=drives,
        volume_group=volume_group,
        endpoints=report.endpoints,
        rdma_devices=[p.summary() for p in report.ports],
        conditions=conditions,
        observed_generation=generation,
    )
    current = dict(node_obj.get("status") or {})
    current.pop("lastHeartbeatTime", None)
    desired = serde.to_dict(status)
    if desired == current:
        return None
    # A field no longer reported (a volume group gone) is removed, not left as it was.
    body = {**{k: None for k in current if k not in desired}, **desired, "lastHeartbeatTime": now}
    written = kube.patch(
        API, "StorageNode", node_obj["metadata"]["name"], {"status": body}, subresource="status"
    )
    metrics.STATUS_WRITES.labels("StorageNode").inc()
    return written
