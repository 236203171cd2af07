"""`flashmesh status` as rows: pools, nodes, volumes and their paths (each segment's
export: subsystem, endpoints, which hosts it lets in), from the objects alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from flashmesh.core.pools import volume_phase
from flashmesh.core.resources import StorageNode, StoragePool, Volume


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]


def _age(stamp: str | None, now: datetime) -> str:
    if not stamp:
        return "never"
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    seconds = int((now - then).total_seconds())
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def pools_table(pools: list[StoragePool]) -> Table:
    rows = []
    for pool in sorted(pools, key=lambda p: p.metadata.name):
        s = pool.status
        nodes = f"{s.nodes_ready or 0}/{s.nodes_total or 0}" if s else "-"
        rows.append((
            pool.metadata.name, (s.phase if s else None) or "-", nodes,
            (s.capacity if s else None) or "-", (s.used if s else None) or "-",
            (s.free if s else None) or "-", (s.storage_class_name if s else None) or "-",
        ))  # fmt: skip
    columns = ("POOL", "PHASE", "READY", "CAPACITY", "USED", "FREE", "STORAGECLASS")
    return Table("Pools", columns, rows)


def nodes_table(nodes: list[StorageNode], now: datetime) -> Table:
    rows = []
    for node in sorted(nodes, key=lambda n: n.metadata.name):
        s = node.status
        group = s.volume_group if s else None
        thin = group.thin_pool if group else None
        endpoints = ", ".join(
            f"{e.transport}://{e.address}:{e.port}" for e in (s.endpoints or [])
        ) if s else ""  # fmt: skip
        rows.append((
            node.metadata.name, node.spec.pool or "-", (s.phase if s else None) or "-",
            _age(s.last_heartbeat_time if s else None, now),
            thin.size if thin else "-", group.free if group else "-", endpoints or "-",
        ))  # fmt: skip
    columns = ("NODE", "POOL", "PHASE", "STATUS WRITTEN", "THIN POOL", "FREE", "ENDPOINTS")
    return Table("Storage nodes", columns, rows)


def volumes_table(volumes: list[Volume]) -> Table:
    rows = []
    for v in sorted(volumes, key=lambda v: (v.spec.pool, v.spec.csi_name)):
        layout = f"{v.spec.layout.stripe_width}x{v.spec.layout.replicas}"
        nodes = ", ".join(sorted({s.node for s in v.spec.segments}))
        rows.append((
            v.spec.csi_name, v.metadata.name, v.spec.pool, v.spec.size, layout,
            volume_phase(v), nodes or "-", str(len(v.spec.hosts)),
        ))  # fmt: skip
    columns = ("PV", "VOLUME", "POOL", "SIZE", "STRIPES x REPLICAS", "PHASE", "NODES", "HOSTS")
    return Table("Volumes", columns, rows)


def paths_table(volumes: list[Volume], host_names: dict[str, str]) -> Table:
    """Each segment's export; hosts shown by their Kubernetes node name when known."""
    rows = []
    for v in sorted(volumes, key=lambda v: v.metadata.name):
        for seg in (v.status.segments if v.status else None) or []:
            endpoints = ", ".join(
                f"{e.transport}://{e.address}:{e.port}" for e in seg.endpoints or []
            )
            hosts = ", ".join(sorted(host_names.get(h, h) for h in seg.hosts or []))
            state = "ready" if seg.ready else (seg.message or "not ready")
            rows.append((
                v.metadata.name, f"{seg.index}/{seg.replica}", seg.node,
                endpoints or "-", hosts or "-", state,
            ))  # fmt: skip
    columns = ("VOLUME", "SEGMENT", "NODE", "ENDPOINTS", "HOSTS ALLOWED", "STATE")
    return Table("Paths (segment exports)", columns, rows)
