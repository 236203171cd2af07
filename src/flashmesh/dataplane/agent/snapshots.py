"""The agent's side of Snapshot objects: a thin snapshot of each local segment of the
source volume, named by the Snapshot's spec; removed when the Snapshot is deleted. A thin
snapshot lives in its origin's thin pool, which is why a snapshot segment (and a volume
restored from it) sits on its source segment's node."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flashmesh.core import naming, resources, serde
from flashmesh.core.resources import Snapshot, SnapshotSegment, SnapshotSegmentStatus
from flashmesh.dataplane.agent import metrics
from flashmesh.dataplane.agent.status import own_entries
from flashmesh.dataplane.lvm import Lvm, LvmError
from flashmesh.kube import Kube

log = logging.getLogger(__name__)
API = resources.API_VERSION


def reconcile_snapshots(
    kube: Kube,
    lvm: Lvm,
    node: str,
    vg: str,
    finalizer: str,
    manager: str,
    objects: list[dict[str, Any]],
    wrote: Callable[[dict[str, Any]], None],
    fetch: Callable[[str], dict[str, Any] | None],
) -> tuple[dict[str, Snapshot], bool]:
    """Makes this node's snapshot segments match the Snapshot objects with a segment here;
    those Snapshots by name (a restore looks its source up there; `fetch` reads one that
    has no segment here), and whether every snapshot segment here is taken."""
    snapshots = _Snapshots(fetch)
    done = True
    for data in objects:
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
        done = done and all(s.ready for s in statuses)
        entries = [serde.to_dict(s) for s in sorted(statuses, key=lambda s: (s.index, s.replica))]
        if own_entries(data, node) == entries:
            continue  # written before: an unchanged status is not written again
        body = {
            "apiVersion": API,
            "kind": "Snapshot",
            "metadata": {"name": name},
            "status": {"segments": entries},
        }
        wrote(kube.apply_status(body, manager))
        metrics.STATUS_WRITES.labels("Snapshot").inc()
    return snapshots, done


class _Snapshots(dict[str, Snapshot]):
    """Snapshots by name; one not cached here (no segment on this node) is read once."""

    def __init__(self, fetch: Callable[[str], dict[str, Any] | None]) -> None:
        super().__init__()
        self._fetch = fetch

    def get(self, name: str, default: Any = None) -> Any:
        if name and name not in self:
            data = self._fetch(name)
            if data is None:
                return default
            self[name] = Snapshot.from_dict(data)
        return super().get(name, default)


def _take(lvm: Lvm, vg: str, node: str, source: str, seg: SnapshotSegment) -> SnapshotSegmentStatus:
    origin = naming.segment_lv(source, seg.index, seg.replica)
    try:
        lvm.ensure_snapshot(vg, origin, seg.thin_volume)
    except LvmError as exc:
        log.warning("snapshot %s: %s", seg.thin_volume, exc)
        return SnapshotSegmentStatus(seg.index, seg.replica, node, False, str(exc))
    return SnapshotSegmentStatus(seg.index, seg.replica, node, True)
