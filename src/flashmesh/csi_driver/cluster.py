"""What the CSI controller reads and writes in Kubernetes: pools, their nodes' space and
health, Volume and Snapshot objects, the CSINodes that name each host NQN. Every wait is
bounded: one that runs out is DEADLINE_EXCEEDED, which the sidecars retry."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc

from flashmesh.core import naming, resources
from flashmesh.core.placement import NodeSpace, heartbeat_fresh, space_used
from flashmesh.core.resources import Snapshot, StorageNode, StoragePool, Volume
from flashmesh.core.units import parse_bytes
from flashmesh.csi_driver.errors import CsiError, invalid
from flashmesh.kube import Kube, KubeError

API = resources.API_VERSION


@dataclass
class Cluster:
    kube: Kube
    # Where the agents renew their Leases.
    namespace: str = "flashmesh-system"
    wait_seconds: float = 120.0
    poll_seconds: float = 0.5

    # --- reading ----------------------------------------------------------------------

    def pool(self, name: str) -> StoragePool:
        data = self.kube.get(API, "StoragePool", name)
        if data is None:
            raise invalid(
                f"parameter pool={name!r} names no StoragePool: create it or fix the name"
            )
        return StoragePool.from_dict(data)

    def pools(self) -> list[str]:
        return sorted(p["metadata"]["name"] for p in self.kube.list(API, "StoragePool"))

    def volume(self, vid: str) -> Volume | None:
        data = self.kube.get(API, "Volume", vid)
        return Volume.from_dict(data) if data else None

    def volumes(self) -> list[Volume]:
        return [Volume.from_dict(v) for v in self.kube.list(API, "Volume")]

    def snapshot(self, sid: str) -> Snapshot | None:
        data = self.kube.get(API, "Snapshot", sid)
        return Snapshot.from_dict(data) if data else None

    def snapshots(self) -> list[Snapshot]:
        return [Snapshot.from_dict(s) for s in self.kube.list(API, "Snapshot")]

    def storage_nodes(self, pool: str) -> list[StorageNode]:
        nodes = [StorageNode.from_dict(n) for n in self.kube.list(API, "StorageNode")]
        return [n for n in nodes if n.spec.pool == pool]

    def node_ready(self, node: StorageNode, now: datetime | None = None) -> bool:
        """Ready in its status, and its agent's Lease still held."""
        if node.status is None or node.status.phase != "Ready":
            return False
        lease = self.kube.get(
            "coordination.k8s.io/v1", "Lease", naming.node_lease(node.metadata.name), self.namespace
        )
        spec = (lease or {}).get("spec") or {}
        return heartbeat_fresh(
            spec.get("renewTime"), int(spec.get("leaseDurationSeconds") or 0), now or _now()
        )

    def space(self, pool: str) -> list[NodeSpace]:
        """Each of the pool's nodes: its thin pool's size, what is promised on it, health."""
        used = space_used(self.volumes(), self.snapshots())
        out = []
        for node in self.storage_nodes(pool):
            group = node.status.volume_group if node.status else None
            thin = group.thin_pool if group else None
            capacity = parse_bytes(thin.size) if thin else 0
            name = node.metadata.name
            out.append(NodeSpace(name, capacity, used.get(name, 0), self.node_ready(node)))
        return out

    def nodes_with_host(self, host_nqn: str) -> list[str]:
        """The nodes whose CSINode carries this host NQN as FlashMesh's node id."""
        names = []
        for csinode in self.kube.list("storage.k8s.io/v1", "CSINode"):
            for driver in (csinode.get("spec") or {}).get("drivers") or []:
                if driver.get("name") == resources.CSI_DRIVER and driver.get("nodeID") == host_nqn:
                    names.append(csinode["metadata"]["name"])
        return sorted(names)

    # --- writing ----------------------------------------------------------------------

    def edit_volume(self, vid: str, change: Callable[[dict[str, Any]], bool]) -> Volume | None:
        """Applies change to the Volume's object (it returns whether it changed anything)
        and writes it, guarded by resourceVersion, retrying on conflicts."""
        for _ in range(10):
            data = self.kube.get(API, "Volume", vid)
            if data is None:
                return None
            if not change(data):
                return Volume.from_dict(data)
            try:
                return Volume.from_dict(self.kube.replace(data))
            except KubeError as exc:
                if exc.status != 409:
                    raise
        raise CsiError(grpc.StatusCode.ABORTED, f"Volume {vid} kept changing; retry")

    def wait(self, what: str, done: Callable[[], str | None]) -> None:
        """Polls done (None when finished, else what is still missing) until it finishes
        or the wait runs out."""
        deadline = time.monotonic() + self.wait_seconds
        missing = done()
        while missing is not None:
            if time.monotonic() > deadline:
                raise CsiError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{what}: still waiting after {self.wait_seconds:.0f} s: {missing}",
                )
            time.sleep(self.poll_seconds)
            missing = done()


def _now() -> datetime:
    return datetime.now(UTC)


def segments_missing(
    volume: Volume | None, host: str | None = None, gone: str | None = None, size: int = 0
) -> str | None:
    """What keeps a volume from being served as asked (None when nothing): every segment
    exported and ready, `host` allowed, `gone` no longer allowed, at least `size` bytes."""
    if volume is None:
        return "the Volume object is gone"
    statuses = {
        (s.index, s.replica): s for s in (volume.status.segments if volume.status else []) or []
    }
    for seg in volume.spec.segments:
        status = statuses.get((seg.index, seg.replica))
        where = f"segment {seg.index}/{seg.replica} on {seg.node}"
        if status is None:
            return f"{where}: no report from its agent yet"
        if not status.ready:
            return f"{where}: {status.message or 'not ready'}"
        hosts = status.hosts or []
        if host and host not in hosts:
            return (
                f"{where}: {host} not allowed yet{': ' + status.message if status.message else ''}"
            )
        if gone and gone in hosts:
            return f"{where}: {gone} still allowed"
        if size and parse_bytes(status.size or "0") < size:
            return f"{where}: {status.size or 'unknown size'}, growing to {size} bytes"
    return None
