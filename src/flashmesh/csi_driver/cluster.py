"""What the CSI controller reads and writes in Kubernetes: pools, their nodes' space and
health, Volume and Snapshot objects, the CSINodes that name each host NQN. Reads come from
watched caches (`cache.py`), so a controller at rest makes no API request. Every wait is
bounded: one that runs out is DEADLINE_EXCEEDED, which the sidecars retry."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc

from flashmesh.core import naming, resources
from flashmesh.core.placement import NodeSpace, heartbeat_fresh, space_used
from flashmesh.core.resources import Snapshot, StorageNode, StoragePool, Volume
from flashmesh.core.units import parse_bytes
from flashmesh.csi_driver.cache import OBSERVE_SECONDS, ControllerCache
from flashmesh.csi_driver.errors import CsiError, invalid
from flashmesh.kube import Kube, KubeError

API = resources.API_VERSION
# The mark the chart's admission policy wants on a Volume before it may be deleted while a
# PersistentVolume names it: set by a deletion asked through CSI (or of an orphan).
DELETE_CONFIRMED = f"{resources.GROUP}/delete-confirmed"
# A wait wakes on every Volume and Snapshot change; this is only the longest it sleeps
# between two looks at the cache when nothing changes (no API request either way).
RECHECK_SECONDS = 5.0


@dataclass
class Cluster:
    kube: Kube
    # Where the agents renew their Leases.
    namespace: str = "flashmesh-system"
    wait_seconds: float = 120.0
    # How long a write waits for the cache to show it (see ControllerCache.observe).
    observe_seconds: float = OBSERVE_SECONDS
    cache: ControllerCache = field(init=False)

    def __post_init__(self) -> None:
        self.cache = ControllerCache(self.kube, self.namespace)
        self._local = threading.local()

    def start(self, timeout: float = 60.0) -> Cluster:
        """Fills the caches and keeps them watched; before the gRPC server serves."""
        self.cache.start(timeout)
        return self

    def stop(self) -> None:
        self.cache.stop()

    # --- reading ----------------------------------------------------------------------
    # A miss in the cache is asked of the API server once only where the object may have
    # been written a moment ago by someone else (a pool just installed, a Volume another
    # controller replica made): that is a call's path, never a controller at rest. Lists
    # and the node health placement needs are the cache's alone: placement must count
    # what the cache counts, and the controller's own writes are in it (`observe`).

    def _cache(self) -> ControllerCache:
        if not self.cache.synced:
            raise CsiError(grpc.StatusCode.UNAVAILABLE, "the controller's caches are not full yet")
        return self.cache

    def _may_ask(self) -> bool:
        # Never inside a wait: its predicate re-reads on every watch event, and a miss
        # there means the object is gone.
        return not getattr(self._local, "waiting", False)

    def pool(self, name: str, fresh: bool = False) -> StoragePool:
        # A StorageClass and its pool are often applied together: one GET before a
        # PVC of a pool just made is refused as INVALID_ARGUMENT. A new volume reads its
        # pool fresh (`fresh`): a setting changed a moment ago (authentication turned on)
        # applies to the next volume even while the watch is behind.
        data = None if fresh and self._may_ask() else self._cache().pools.get(name)
        if data is None and self._may_ask():
            data = self.kube.get(API, "StoragePool", name)
        if data is None:
            raise invalid(
                f"parameter pool={name!r} names no StoragePool: create it or fix the name"
            )
        return StoragePool.from_dict(data)

    def pools(self) -> list[str]:
        return sorted(p["metadata"]["name"] for p in self._cache().pools.items())

    def volume(self, vid: str) -> Volume | None:
        # A miss is asked once: before CreateVolume creates (a Volume made a moment ago
        # elsewhere is found, not created twice), and so that a call on a Volume written
        # just now (a publish right after a create) is not refused NOT_FOUND.
        data = self._cache().volumes.get(vid)
        if data is None and self._may_ask():
            data = self.kube.get(API, "Volume", vid)
        return Volume.from_dict(data) if data else None

    def has_volume(self, vid: str) -> bool:
        """Whether the cache holds this Volume (no API request)."""
        return self._cache().volumes.get(vid) is not None

    def volumes(self) -> list[Volume]:
        return [Volume.from_dict(v) for v in self._cache().volumes.items()]

    def snapshot(self, sid: str) -> Snapshot | None:
        # As volume(): a restore or delete of a snapshot made a moment ago finds it.
        data = self._cache().snapshots.get(sid)
        if data is None and self._may_ask():
            data = self.kube.get(API, "Snapshot", sid)
        return Snapshot.from_dict(data) if data else None

    def snapshots(self) -> list[Snapshot]:
        return [Snapshot.from_dict(s) for s in self._cache().snapshots.items()]

    def storage_nodes(self, pool: str) -> list[StorageNode]:
        nodes = [StorageNode.from_dict(n) for n in self._cache().storage_nodes.items()]
        return [n for n in nodes if n.spec.pool == pool]

    def node_ready(self, node: StorageNode, now: datetime | None = None) -> bool:
        """Ready in its status, and its agent's Lease still held."""
        if node.status is None or node.status.phase != "Ready":
            return False
        lease = self._cache().leases.get(naming.node_lease(node.metadata.name), self.namespace)
        spec = (lease or {}).get("spec") or {}
        return heartbeat_fresh(
            spec.get("renewTime"), int(spec.get("leaseDurationSeconds") or 0), now or _now()
        )

    def space(self, pool: str, fresh: bool = False) -> list[NodeSpace]:
        """Each of the pool's nodes: its thin pool's size, what is promised on it, health.
        fresh: what is promised is counted from the API server's Volumes and Snapshots, not
        the caches (another controller placed last: its Volume may not be cached yet)."""
        if fresh:
            volumes = [Volume.from_dict(v) for v in self.kube.list(API, "Volume")]
            snapshots = [Snapshot.from_dict(s) for s in self.kube.list(API, "Snapshot")]
            used = space_used(volumes, snapshots)
        else:
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
        """The nodes whose CSINode carries this host NQN as FlashMesh's node id (a node
        registered a moment ago is NOT_FOUND until its watch event: the attacher retries)."""
        names = []
        for csinode in self._cache().csinodes.items():
            for driver in (csinode.get("spec") or {}).get("drivers") or []:
                if driver.get("name") == resources.CSI_DRIVER and driver.get("nodeID") == host_nqn:
                    names.append(csinode["metadata"]["name"])
        return sorted(names)

    # --- writing ----------------------------------------------------------------------
    # Every write returns once the cache shows it: the next read, above all the next
    # placement's space(), counts what was just written.

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        written = self.kube.create(body)
        self.cache.observe(written, self.observe_seconds)
        return written

    def edit_volume(self, vid: str, change: Callable[[dict[str, Any]], bool]) -> Volume | None:
        """Applies change to the Volume's object (it returns whether it changed anything)
        and writes it, guarded by resourceVersion, retrying on conflicts. A write path:
        it reads the object from the API server, not the cache, so a conflict is rare."""
        for _ in range(10):
            data = self.kube.get(API, "Volume", vid)
            if data is None:
                return None
            if not change(data):
                return Volume.from_dict(data)
            try:
                written = self.kube.replace(data)
            except KubeError as exc:
                if exc.status != 409:
                    raise
                continue
            self.cache.observe(written, self.observe_seconds)
            return Volume.from_dict(written)
        raise CsiError(grpc.StatusCode.ABORTED, f"Volume {vid} kept changing; retry")

    def mark_snapshot_ready(self, sid: str, manager: str) -> Snapshot:
        """Sets readyToUse (and the creation time) once every segment is taken."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": API,
            "kind": "Snapshot",
            "metadata": {"name": sid},
            "status": {"readyToUse": True, "creationTime": now},
        }
        written = self.kube.apply_status(body, manager)
        self.cache.observe(written, self.observe_seconds)
        return Snapshot.from_dict(written)

    def wait(self, what: str, done: Callable[[], str | None]) -> None:
        """Waits until done returns None (else it says what is still missing) or the wait
        runs out. done reads the cache only, and is evaluated again on every Volume and
        Snapshot change the watches bring: no API request while waiting."""
        deadline = time.monotonic() + self.wait_seconds
        self._local.waiting = True
        try:
            while True:
                since = self.cache.changes()
                missing = done()
                if missing is None:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CsiError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"{what}: still waiting after {self.wait_seconds:.0f} s: {missing}",
                    )
                self.cache.wait_change(since, min(left, RECHECK_SECONDS))
        finally:
            self._local.waiting = False


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
            why = f" ({status.message})" if status.message else ""
            return f"{where}: {status.size or 'unknown size'}, growing to {size} bytes{why}"
    return None
