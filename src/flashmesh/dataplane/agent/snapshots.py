"""The agent's side of Snapshot objects: a thin snapshot of each local segment of the
source volume, named by the Snapshot's spec; removed when the Snapshot is deleted. A thin
snapshot lives in its origin's thin pool, which is why a snapshot segment (and a volume
restored from it) sits on its source segment's node."""

from __future__ import annotations

import logging

from flashmesh.core import naming, resources, serde
from flashmesh.core.resources import Snapshot, SnapshotSegment, SnapshotSegmentStatus
from flashmesh.dataplane.lvm import Lvm, LvmError
from flashmesh.kube import Kube

log = logging.getLogger(__name__)
API = resources.API_VERSION


def reconcile_snapshots(
    kube: Kube, lvm: Lvm, node: str, vg: str, finalizer: str, manager: str
) -> dict[str, Snapshot]:
    """Makes this node's snapshot segments match the Snapshot objects; every Snapshot by
    name (a restore looks its source up there)."""
    snapshots = {}
    for data in kube.list(API, "Snapshot"):
        snapshot = Snapshot.from_dict(data)
        name = snapshot.metadata.name
        snapshots[name] = snapshot
        mine = [s for s in snapshot.spec.segments if s.node == node]
        if not mine:
            continue
        if snapshot.metadata.deletion_timestamp is not None:
            if finalizer in (snapshot.metadata.finalizers or []):
                for seg in mine:
                    lvm.remove_volume(vg, seg.thin_volume)
                kube.remove_finalizer(API, "Snapshot", name, finalizer)
            continue
        # The finalizer before the thin snapshot: a snapshot made is never forgotten.
        has = finalizer in (snapshot.metadata.finalizers or [])
        if not has and not kube.add_finalizer(API, "Snapshot", name, finalizer):
            continue
        statuses = [_take(lvm, vg, node, snapshot.spec.source_volume, seg) for seg in mine]
        body = {
            "apiVersion": API,
            "kind": "Snapshot",
            "metadata": {"name": name},
            "status": {"segments": [serde.to_dict(s) for s in statuses]},
        }
        kube.apply_status(body, manager)
    return snapshots


def _take(lvm: Lvm, vg: str, node: str, source: str, seg: SnapshotSegment) -> SnapshotSegmentStatus:
    origin = naming.segment_lv(source, seg.index, seg.replica)
    try:
        lvm.ensure_snapshot(vg, origin, seg.thin_volume)
    except LvmError as exc:
        log.warning("snapshot %s: %s", seg.thin_volume, exc)
        return SnapshotSegmentStatus(seg.index, seg.replica, node, False, str(exc))
    return SnapshotSegmentStatus(seg.index, seg.replica, node, True)
