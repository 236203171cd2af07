"""One StoragePool reconciled: read the nodes, volumes, snapshots and heartbeats, decide
(core.pools), then write what differs: node membership, the pool's classes, its status,
and an Event for every change."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flashmesh.core import naming, pools, resources, serde
from flashmesh.core.placement import heartbeat_fresh, space_used
from flashmesh.core.resources import Snapshot, StorageNode, StoragePool, Volume
from flashmesh.kube import Kube, KubeError

API = resources.API_VERSION
COMPONENT = "flashmesh-operator"
log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class PoolReport:
    status: resources.StoragePoolStatus
    volume_phases: dict[str, int]


@dataclass
class PoolReconciler:
    kube: Kube
    namespace: str  # where the agents renew their heartbeat Leases

    def _event(self, obj: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
        try:
            self.kube.event(obj, reason, message, warning=warning, component=COMPONENT)
        except KubeError as exc:  # an Event is worth a log line, never a failed reconcile
            log.warning("event %s on %s not written: %s", reason, obj["metadata"]["name"], exc)

    def _fresh(self, node: str, now: datetime) -> bool:
        lease = self.kube.get(
            "coordination.k8s.io/v1", "Lease", naming.node_lease(node), self.namespace
        )
        spec = (lease or {}).get("spec") or {}
        return heartbeat_fresh(
            spec.get("renewTime"), int(spec.get("leaseDurationSeconds") or 0), now
        )

    def reconcile(self, name: str) -> PoolReport | None:
        """The pool read afresh (an event's copy may be older than the last write);
        None when it is gone."""
        pool_obj = self.kube.get(API, "StoragePool", name)
        if pool_obj is None:
            return None
        pool = StoragePool.from_dict(pool_obj)
        nodes = [StorageNode.from_dict(o) for o in self.kube.list(API, "StorageNode")]
        volumes = [Volume.from_dict(o) for o in self.kube.list(API, "Volume")]
        snapshots = [Snapshot.from_dict(o) for o in self.kube.list(API, "Snapshot")]
        used = space_used(pools.pool_volumes(pool.metadata.name, volumes), snapshots)
        node_labels = {
            o["metadata"]["name"]: o["metadata"].get("labels") or {}
            for o in self.kube.list("v1", "Node")
        }
        members = pools.membership(pool, nodes, used, node_labels)
        self._move_nodes(pool_obj, members)
        now = _now()
        health = {}
        for node in nodes:
            if node.metadata.name in members.members:
                fresh = self._fresh(node.metadata.name, now)
                health[node.metadata.name] = pools.node_health(node, fresh)
                if not fresh and node.status is not None and node.status.phase == "Ready":
                    self._mark_stale(node, now)
        class_problem = self._ensure_classes(pool_obj, pool)
        status = pools.pool_status(
            pool, members, health, volumes, snapshots, pools.class_name(pool.metadata.name)
        )
        if class_problem and status.conditions:
            status.conditions[0] = resources.Condition("Ready", "False", "NoClass", class_problem)
            status.phase = "NotReady"
        self._write_status(pool_obj, status)
        return PoolReport(status, pools.volume_phases(pool.metadata.name, volumes))

    def _mark_stale(self, node: StorageNode, now: datetime) -> None:
        """A node whose agent went silent turns NotReady, for everyone who reads it."""
        name = node.metadata.name
        obj = self.kube.get(API, "StorageNode", name) or {}
        conditions = (obj.get("status") or {}).get("conditions") or []
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        marked = pools.heartbeat_lost(conditions, stamp)
        status = {"phase": "NotReady", "conditions": marked}
        self.kube.patch(API, "StorageNode", name, {"status": status}, subresource="status")
        if obj:
            self._event(obj, pools.STALE_REASON, marked[-1]["message"], warning=True)

    def _move_nodes(self, pool_obj: dict[str, Any], members: pools.Membership) -> None:
        name = pool_obj["metadata"]["name"]
        for node, target, reason, verb in [
            *((n, name, "NodeJoined", "joined") for n in members.join),
            *((n, None, "NodeLeft", "left") for n in members.leave),
        ]:
            self.kube.patch(API, "StorageNode", node, {"spec": {"pool": target}})
            self._event(pool_obj, reason, f"StorageNode {node} {verb} the pool")

    def _ensure_classes(self, pool_obj: dict[str, Any], pool: StoragePool) -> str | None:
        """The pool's StorageClass and VolumeSnapshotClass, made or made again; a reason
        the pool cannot be used, or None."""
        problem = None
        for desired in (pools.storage_class(pool), pools.snapshot_class(pool)):
            kind, name = desired["kind"], desired["metadata"]["name"]
            try:
                current = self.kube.get(desired["apiVersion"], kind, name)
            except KubeError as exc:
                if kind == "VolumeSnapshotClass" and exc.status == 404:
                    continue  # no snapshot CRDs in this cluster: snapshots are off
                raise
            owner = ((current or {}).get("metadata", {}).get("labels") or {}).get(pools.POOL_LABEL)
            if current is not None and owner != pool.metadata.name:
                problem = (
                    f"{kind} {name} exists and is not this pool's (no label "
                    f"{pools.POOL_LABEL}={pool.metadata.name}): rename or delete it"
                )
                continue
            drift = pools.class_drift(desired, current)
            if drift is None:
                continue
            if current is not None:  # immutable fields: delete, then make it again
                self.kube.delete(desired["apiVersion"], kind, name)
            self.kube.create(desired)
            verb = "created" if current is None else f"made again ({drift})"
            self._event(pool_obj, f"{kind}Ready", f"{kind} {name} {verb}")
        return problem

    def _write_status(self, pool_obj: dict[str, Any], status: resources.StoragePoolStatus) -> None:
        previous = (pool_obj.get("status") or {}).get("conditions") or []
        stamp = _now().strftime("%Y-%m-%dT%H:%M:%SZ")
        pools.carry_transition_times(status.conditions or [], previous, stamp)
        for c in pools.changed_conditions(status.conditions or [], previous):
            bad = (c.type == "Ready") != (c.status == "True")
            self._event(pool_obj, c.reason, f"{c.type}={c.status}: {c.message}", warning=bad)
        body = serde.to_dict(status)
        if body != (pool_obj.get("status") or {}):
            self.kube.patch(
                API, "StoragePool", pool_obj["metadata"]["name"], {"status": body},
                subresource="status",
            )  # fmt: skip

    def volumes_left(self, pool: str) -> list[str]:
        """The volumes still provisioned from a pool, as their PVC-given CSI names."""
        volumes = [Volume.from_dict(o) for o in self.kube.list(API, "Volume")]
        return sorted(v.spec.csi_name for v in pools.pool_volumes(pool, volumes))

    def release_nodes(self, pool_obj: dict[str, Any]) -> None:
        """A deleted pool lets its nodes go, so another pool can take them."""
        name = pool_obj["metadata"]["name"]
        for node in self.kube.list(API, "StorageNode"):
            if (node.get("spec") or {}).get("pool") == name:
                self.kube.patch(
                    API, "StorageNode", node["metadata"]["name"], {"spec": {"pool": None}}
                )
