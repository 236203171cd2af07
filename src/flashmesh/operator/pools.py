"""One StoragePool reconciled from what the operator's watches keep (PoolInputs, plain
copies taken from its indexes): decide (core.pools), then write what differs: node
membership, the pool's classes, its status, and an Event for every change. It reads
nothing from the API; every write's answer is remembered (cache.Recent) until the watch
brings it back."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flashmesh.core import naming, pools, resources, serde
from flashmesh.core.placement import space_used
from flashmesh.core.resources import Snapshot, StorageNode, StoragePool, Volume
from flashmesh.kube import Kube, KubeError
from flashmesh.operator.cache import Recent, version
from flashmesh.operator.leases import Renewal, fresh

API = resources.API_VERSION
COMPONENT = "flashmesh-operator"
log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class PoolInputs:
    """Everything one pool's reconcile reads, each object the latest this operator knows."""

    pool: dict[str, Any]
    nodes: list[dict[str, Any]]  # every StorageNode
    volumes: list[Volume]
    snapshots: list[Snapshot]
    node_labels: dict[str, dict[str, str]]  # Kubernetes Node name -> its labels
    renewals: dict[str, Renewal]  # the agents' Leases by Lease name
    classes: dict[str, dict[str, Any] | None]  # kind -> the class named for the pool, or None
    snapshot_classes: bool = True  # whether the cluster serves VolumeSnapshotClasses


@dataclass(frozen=True)
class PoolReport:
    status: resources.StoragePoolStatus
    volume_phases: dict[str, int]


@dataclass
class PoolReconciler:
    kube: Kube
    recent: Recent = field(default_factory=Recent)

    def _event(self, obj: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
        try:
            self.kube.event(obj, reason, message, warning=warning, component=COMPONENT)
        except KubeError as exc:  # an Event is worth a log line, never a failed reconcile
            log.warning("event %s on %s not written: %s", reason, obj["metadata"]["name"], exc)

    def _patch(
        self, kind: str, obj: dict[str, Any], patch: dict[str, Any], subresource: str | None = None
    ) -> None:
        name = obj["metadata"]["name"]
        answer = self.kube.patch(API, kind, name, patch, subresource=subresource)
        self.recent.wrote((kind, name), version(obj), answer)

    def reconcile(self, seen: PoolInputs) -> PoolReport:
        pool_obj = seen.pool
        pool = StoragePool.from_dict(pool_obj)
        objs = {o["metadata"]["name"]: o for o in seen.nodes}
        nodes = [StorageNode.from_dict(o) for o in seen.nodes]
        volumes = pools.pool_volumes(pool.metadata.name, seen.volumes)
        used = space_used(volumes, seen.snapshots)
        members = pools.membership(pool, nodes, used, seen.node_labels)
        self._move_nodes(pool_obj, members, objs)
        now = _now()
        health = {}
        for node in nodes:
            name = node.metadata.name
            if name in members.members:
                alive = fresh(seen.renewals.get(naming.node_lease(name)), now)
                health[name] = pools.node_health(node, alive)
                if not alive and node.status is not None and node.status.phase == "Ready":
                    self._mark_stale(objs[name], now)
        class_problem = self._ensure_classes(pool_obj, pool, seen)
        status = pools.pool_status(
            pool, members, health, volumes, seen.snapshots, pools.class_name(pool.metadata.name)
        )
        if class_problem and status.conditions:
            status.conditions[0] = resources.Condition("Ready", "False", "NoClass", class_problem)
            status.phase = "NotReady"
        self._write_status(pool_obj, status)
        return PoolReport(status, pools.volume_phases(pool.metadata.name, volumes))

    def _mark_stale(self, obj: dict[str, Any], now: datetime) -> None:
        """A node whose agent went silent turns NotReady, for everyone who reads it."""
        conditions = (obj.get("status") or {}).get("conditions") or []
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        marked = pools.heartbeat_lost(conditions, stamp)
        status = {"phase": "NotReady", "conditions": marked}
        self._patch("StorageNode", obj, {"status": status}, subresource="status")
        self._event(obj, pools.STALE_REASON, marked[-1]["message"], warning=True)

    def _move_nodes(
        self, pool_obj: dict[str, Any], members: pools.Membership, objs: dict[str, dict[str, Any]]
    ) -> None:
        name = pool_obj["metadata"]["name"]
        for node, target, reason, verb in [
            *((n, name, "NodeJoined", "joined") for n in members.join),
            *((n, None, "NodeLeft", "left") for n in members.leave),
        ]:
            self._patch("StorageNode", objs[node], {"spec": {"pool": target}})
            self._event(pool_obj, reason, f"StorageNode {node} {verb} the pool")

    def _ensure_classes(
        self, pool_obj: dict[str, Any], pool: StoragePool, seen: PoolInputs
    ) -> str | None:
        """The pool's StorageClass and VolumeSnapshotClass, made or made again; a reason
        the pool cannot be used, or None."""
        problem = None
        for desired in (pools.storage_class(pool), pools.snapshot_class(pool)):
            kind, name = desired["kind"], desired["metadata"]["name"]
            if kind == "VolumeSnapshotClass" and not seen.snapshot_classes:
                continue  # no snapshot CRDs in this cluster: snapshots are off
            current = seen.classes.get(kind)
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
            try:
                made = self.kube.create(desired)
            except KubeError as exc:
                if exc.status == 409:  # made a moment ago; the watch has not shown it yet
                    continue
                if kind == "VolumeSnapshotClass" and exc.status == 404:
                    continue  # its CRD went away a moment ago
                raise
            self.recent.wrote((kind, name), version(current), made)
            verb = "created" if current is None else f"made again ({drift})"
            self._event(pool_obj, f"{kind}Ready", f"{kind} {name} {verb}")
        return problem

    def _write_status(self, pool_obj: dict[str, Any], status: resources.StoragePoolStatus) -> None:
        """Compared with the latest status known (the index's, or our own last write's
        answer while the index is behind it): the Events and the write happen only for
        what differs from it."""
        previous = (pool_obj.get("status") or {}).get("conditions") or []
        stamp = _now().strftime("%Y-%m-%dT%H:%M:%SZ")
        pools.carry_transition_times(status.conditions or [], previous, stamp)
        for c in pools.changed_conditions(status.conditions or [], previous):
            bad = (c.type == "Ready") != (c.status == "True")
            self._event(pool_obj, c.reason, f"{c.type}={c.status}: {c.message}", warning=bad)
        body = serde.to_dict(status)
        if body != (pool_obj.get("status") or {}):
            self._patch("StoragePool", pool_obj, {"status": body}, subresource="status")

    def release_nodes(self, name: str, nodes: list[dict[str, Any]]) -> None:
        """A deleted pool lets its nodes go, so another pool can take them."""
        for node in nodes:
            if (node.get("spec") or {}).get("pool") == name:
                self._patch("StorageNode", node, {"spec": {"pool": None}})
        self.recent.forget(("StoragePool", name))


def volumes_left(pool: str, volumes: list[Volume]) -> list[str]:
    """The volumes still provisioned from a pool, as their PVC-given CSI names."""
    return sorted(v.spec.csi_name for v in pools.pool_volumes(pool, volumes))
