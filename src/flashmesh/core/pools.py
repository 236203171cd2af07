"""What the operator decides for a StoragePool, from the objects it reads: which
StorageNodes join or leave it, the StorageClass and VolumeSnapshotClass that serve it,
and its status (capacity summed over its nodes, health, conditions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flashmesh.core import resources
from flashmesh.core.placement import space_used
from flashmesh.core.resources import (
    Condition,
    Snapshot,
    StorageNode,
    StoragePool,
    StoragePoolStatus,
    Volume,
)
from flashmesh.core.selectors import matches
from flashmesh.core.units import format_bytes, parse_bytes

# The operator's finalizer on a pool: the backstop behind the admission policy that
# refuses deleting a pool still holding volumes.
FINALIZER = "flashmesh.dev/operator"
POOL_LABEL = "flashmesh.dev/pool"  # on the StorageClass and VolumeSnapshotClass of a pool
STALE_REASON = "HeartbeatStale"  # a StorageNode's Ready reason once its heartbeat is lost


@dataclass(frozen=True)
class NodeHealth:
    """One StorageNode as the operator judges it."""

    name: str
    ready: bool
    why: str  # "serving", or what is wrong, for the pool's Degraded condition
    capacity: int  # its thin pool, in bytes


@dataclass
class Membership:
    """Which StorageNodes the pool takes, lets go and cannot take, by name."""

    join: list[str] = field(default_factory=list)
    leave: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)  # after join and leave
    held: list[str] = field(default_factory=list)  # unselected, but still holding data
    claimed: dict[str, str] = field(default_factory=dict)  # selected, but in another pool


def membership(
    pool: StoragePool,
    nodes: list[StorageNode],
    used: dict[str, int],
    node_labels: dict[str, dict[str, str]] | None = None,
) -> Membership:
    """Nodes the selector picks join when they are in no pool; members it no longer picks
    leave once nothing of theirs is in use (until then they stay, and status says so).

    The selector matches a StorageNode's labels over those of the Kubernetes Node of the
    same name (node_labels), so `kubectl label node` is enough on a real cluster."""
    out = Membership()
    name = pool.metadata.name
    for node in sorted(nodes, key=lambda n: n.metadata.name):
        node_name = node.metadata.name
        current = node.spec.pool or ""
        labels = {**(node_labels or {}).get(node_name, {}), **(node.metadata.labels or {})}
        selected = matches(pool.spec.node_selector, labels)
        if current == name:
            if selected:
                out.members.append(node_name)
            elif used.get(node_name, 0):
                out.members.append(node_name)
                out.held.append(node_name)
            else:
                out.leave.append(node_name)
        elif selected and not current:
            out.join.append(node_name)
            out.members.append(node_name)
        elif selected:
            out.claimed[node_name] = current
    return out


def node_health(node: StorageNode, heartbeat_fresh: bool) -> NodeHealth:
    """Ready when its agent says so and its heartbeat Lease still holds; a refused or
    missing drive (DrivesReady False) is reported but does not stop the node serving."""
    status = node.status
    group = status.volume_group if status else None
    thin = group.thin_pool if group else None
    capacity = parse_bytes(thin.size) if thin else 0
    name = node.metadata.name
    if status is None or status.phase is None:
        return NodeHealth(name, False, "no status from its agent yet", capacity)
    conditions = {c.type: c for c in status.conditions or []}
    ready = conditions.get("Ready")
    # Once the operator marked the node (heartbeat_lost), the pool still says why: the same
    # words before and after the mark, so the mark changes nothing in the pool's status.
    marked = ready is not None and ready.reason == STALE_REASON
    if not heartbeat_fresh and (status.phase == "Ready" or marked):
        return NodeHealth(name, False, "heartbeat stale: its agent stopped renewing", capacity)
    if status.phase != "Ready":
        return NodeHealth(name, False, f"NotReady: {ready.message if ready else '?'}", capacity)
    drives = conditions.get("DrivesReady")
    if drives is not None and drives.status == "False":
        return NodeHealth(name, True, f"drive problem: {drives.message}", capacity)
    return NodeHealth(name, True, "serving", capacity)


def heartbeat_lost(conditions: list[dict[str, Any]], now: str) -> list[dict[str, Any]]:
    """A StorageNode's conditions once its agent stopped renewing its Lease: Ready turns
    False (the agent sets it back when it returns); the others are kept as they were."""
    ready = {
        "type": "Ready",
        "status": "False",
        "reason": STALE_REASON,
        "message": "its agent stopped renewing its heartbeat Lease: volumes are not placed here",
        "lastTransitionTime": now,
    }
    return [*(c for c in conditions if c.get("type") != "Ready"), ready]


def volume_phase(volume: Volume) -> str:
    """Deleting, Ready (every segment exported and ready) or Pending."""
    if volume.metadata.deletion_timestamp:
        return "Deleting"
    found = (volume.status.segments if volume.status else None) or []
    ready = {(s.index, s.replica) for s in found if s.ready}
    wanted = {(s.index, s.replica) for s in volume.spec.segments}
    return "Ready" if wanted and wanted <= ready else "Pending"


def volume_phases(pool: str, volumes: list[Volume]) -> dict[str, int]:
    counts = {"Pending": 0, "Ready": 0, "Deleting": 0}
    for volume in pool_volumes(pool, volumes):
        counts[volume_phase(volume)] += 1
    return counts


def pool_volumes(pool: str, volumes: list[Volume]) -> list[Volume]:
    return [v for v in volumes if v.spec.pool == pool]


def pool_status(
    pool: StoragePool,
    members: Membership,
    health: dict[str, NodeHealth],
    volumes: list[Volume],
    snapshots: list[Snapshot],
    storage_class: str,
) -> StoragePoolStatus:
    """Capacity, used and free summed over the member nodes; Ready while at least one
    member serves; Degraded while any member is unhealthy or a selected node is held by
    another pool or a member stays only for its data."""
    used_on = space_used(pool_volumes(pool.metadata.name, volumes), snapshots)
    nodes = members.members
    known = [health[n] for n in nodes if n in health]
    capacity = sum(h.capacity for h in known)
    used = sum(used_on.get(n, 0) for n in nodes)
    ready = [h.name for h in known if h.ready]
    problems = [f"{h.name}: {h.why}" for h in known if h.why != "serving"]
    problems += [f"{n} is selected but belongs to pool {p}" for n, p in members.claimed.items()]
    problems += [
        f"{n} no longer matches the nodeSelector and stays until its volumes are deleted"
        for n in members.held
    ]
    if not nodes:
        phase, ready_cond = (
            "Pending",
            Condition("Ready", "False", "NoNodes", "the nodeSelector selects no StorageNode"),
        )
    elif not ready:
        phase, ready_cond = (
            "NotReady",
            Condition("Ready", "False", "NoNodeReady", f"none of {len(nodes)} node(s) serves"),
        )
    else:
        phase = "Degraded" if problems else "Ready"
        ready_cond = Condition(
            "Ready", "True", "NodesReady", f"{len(ready)} of {len(nodes)} node(s) serving"
        )
    degraded = (
        Condition("Degraded", "True", "NodeProblems", "; ".join(problems))
        if problems
        else Condition("Degraded", "False", "AllHealthy", "every node serving")
    )
    return StoragePoolStatus(
        phase=phase,
        nodes_total=len(nodes),
        nodes_ready=len(ready),
        nodes=nodes,
        capacity=format_bytes(capacity),
        used=format_bytes(used),
        free=format_bytes(max(capacity - used, 0)),
        storage_class_name=storage_class,
        conditions=[ready_cond, degraded],
        observed_generation=pool.metadata.generation,
    )


def carry_transition_times(
    conditions: list[Condition], previous: list[dict[str, Any]], now: str
) -> list[Condition]:
    """lastTransitionTime moves only when a condition's status changes."""
    before = {c.get("type"): c for c in previous}
    for c in conditions:
        old = before.get(c.type)
        kept = old is not None and old.get("status") == c.status
        c.last_transition_time = old.get("lastTransitionTime") if kept and old else now
    return conditions


def changed_conditions(
    conditions: list[Condition], previous: list[dict[str, Any]]
) -> list[Condition]:
    """The conditions whose status or message differ from before: each is an Event."""
    before = {c.get("type"): (c.get("status"), c.get("message")) for c in previous}
    return [c for c in conditions if before.get(c.type) != (c.status, c.message)]


def owner_reference(pool: StoragePool) -> dict[str, Any]:
    """Makes the garbage collector remove a pool's classes with it."""
    return {
        "apiVersion": resources.API_VERSION,
        "kind": StoragePool.KIND,
        "name": pool.metadata.name,
        "uid": pool.metadata.uid,
        "blockOwnerDeletion": False,
    }


def class_name(pool: str) -> str:
    return f"flashmesh-{pool}"


def storage_class(pool: StoragePool) -> dict[str, Any]:
    """The pool's StorageClass: late binding, so the scheduler picks the pod's node first
    and the controller places the volume where that node's fabric reaches."""
    parameters = {
        "pool": pool.metadata.name,
        "stripeWidth": str(pool.spec.layout.stripe_width),
        "replicas": str(pool.spec.layout.replicas),
    }
    if len(pool.spec.transports) == 1:
        parameters["transport"] = pool.spec.transports[0]
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": class_name(pool.metadata.name),
            "labels": {POOL_LABEL: pool.metadata.name},
            "ownerReferences": [owner_reference(pool)],
        },
        "provisioner": resources.CSI_DRIVER,
        "parameters": parameters,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": True,
    }


def snapshot_class(pool: StoragePool) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotClass",
        "metadata": {
            "name": class_name(pool.metadata.name),
            "labels": {POOL_LABEL: pool.metadata.name},
            "ownerReferences": [owner_reference(pool)],
        },
        "driver": resources.CSI_DRIVER,
        "deletionPolicy": "Delete",
    }


def class_drift(desired: dict[str, Any], current: dict[str, Any] | None) -> str | None:
    """Why an existing class must be made again, or None. A StorageClass's parameters,
    provisioner and binding mode cannot be changed in place."""
    if current is None:
        return "missing"
    for key in ("provisioner", "parameters", "volumeBindingMode", "driver", "deletionPolicy"):
        if key in desired and current.get(key) != desired[key]:
            return f"{key} differs"
    if current.get("allowVolumeExpansion") != desired.get("allowVolumeExpansion"):
        return "allowVolumeExpansion differs"
    return None
