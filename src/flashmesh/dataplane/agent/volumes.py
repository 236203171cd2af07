"""The agent's side of Volume objects: a thin logical volume per local segment (a copy of
its source snapshot or volume when it has one), exported through nvmet to exactly the
volume's hosts; each segment's status written back; a deleted volume's exports and logical
volumes removed before this node's finalizer is."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashmesh.core import naming, resources, serde
from flashmesh.core.resources import Endpoint, Snapshot, Volume
from flashmesh.core.units import format_bytes, parse_bytes
from flashmesh.dataplane.agent import metrics
from flashmesh.dataplane.agent.status import own_entries
from flashmesh.dataplane.lvm import Lvm, LvmError
from flashmesh.dataplane.target import configfs
from flashmesh.dataplane.target.desired import (
    LocalSegment,
    desired_target,
    local_segments,
    segment_statuses,
)
from flashmesh.dataplane.target.fencing import Cutoffs
from flashmesh.dataplane.target.model import Target
from flashmesh.dataplane.target.planner import plan
from flashmesh.kube import Kube, KubeError

log = logging.getLogger(__name__)
API = resources.API_VERSION


@dataclass
class VolumeReconciler:
    kube: Kube
    node: str
    finalizer: str
    manager: str
    nvmet_root: Path
    lvm: Lvm
    vg: str
    endpoints: list[Endpoint]
    # With authentication on, each allowed host's DH-HMAC-CHAP secret; None when off.
    keys: dict[str, str] | None
    # Host NQNs no export may allow, each with the reason a person reads in the status.
    refused: dict[str, str]
    # Where cut-offs are recorded until done (see target/fencing.py).
    cutoffs: Cutoffs
    # Told of every object a write returned (the watch then knows its own writes).
    wrote: Callable[[dict[str, Any]], None] = lambda obj: None

    def run(
        self, objects: list[dict[str, Any]], volumes: list[Volume], snapshots: dict[str, Snapshot]
    ) -> bool:
        """Makes this node's segments match the volumes (`objects` as the API server holds
        them, `volumes` parsed); True when every live segment here is exported and ready."""
        current = {o["metadata"]["name"]: o for o in objects}
        ours = [v for v in volumes if any(s.node == self.node for s in v.spec.segments)]
        live = []
        for volume in ours:
            if volume.metadata.deletion_timestamp is not None:
                continue
            # The finalizer first: a logical volume made is never forgotten.
            has = self.finalizer in (volume.metadata.finalizers or [])
            if has or self.kube.add_finalizer(API, "Volume", volume.metadata.name, self.finalizer):
                live.append(volume)
        errors: dict[str, str] = {}
        sizes: dict[str, int] = {}
        # Segments still served as they were while a change of them failed (a grow).
        held: dict[str, str] = {}
        existing = {lv.name: lv.size for lv in self.lvm.logical_volumes(self.vg)}
        exportable = [
            v for v in live if self._ensure_volumes(v, existing, snapshots, errors, sizes, held)
        ]
        fs = configfs.Fs(self.nvmet_root)
        desired = desired_target(
            self.node, exportable, self.vg, self.endpoints, self.keys, frozenset(self.refused)
        )
        # Object by object: one subsystem, host or port refused never holds up the others.
        failures = configfs.apply_each(
            fs, plan(desired, configfs.observe(fs, self.cutoffs)), self.cutoffs
        )
        for nqn, why in failures.subsystems.items():
            errors.setdefault(nqn, f"nvmet: {why}")
        for nqn, lv in self._grown(existing, sizes, live):
            # The namespace reads its new size only when told; hosts then get an event.
            configfs.revalidate_size(fs, nqn)
            log.info("grew %s to %d bytes", lv, sizes[nqn])
        observed = configfs.observe(fs, self.cutoffs)
        shown = {nqn: format_bytes(size) for nqn, size in sizes.items()}
        statuses = segment_statuses(
            self.node, live, observed, self.endpoints, errors, self.refused, shown, held
        )
        entries_all = [e for entries in statuses.values() for e in entries]
        ready = sum(1 for e in entries_all if e.ready)
        metrics.record_exports(ready, len(entries_all) - ready)
        for name, entries in statuses.items():
            ordered = sorted(entries, key=lambda s: (s.index, s.replica))
            body_entries = [serde.to_dict(s) for s in ordered]
            if own_entries(current.get(name), self.node) == body_entries:
                continue  # written before: an unchanged status is not written again
            body = {
                "apiVersion": API,
                "kind": "Volume",
                "metadata": {"name": name},
                "status": {"segments": body_entries},
            }
            self.wrote(self.kube.apply_status(body, self.manager))
            metrics.STATUS_WRITES.labels("Volume").inc()
        released = all([self._release(v, observed) for v in ours if v.metadata.deletion_timestamp])
        return released and ready == len(entries_all) and not errors and not held and not failures

    def _grown(
        self, before: dict[str, int], sizes: dict[str, int], volumes: list[Volume]
    ) -> list[tuple[str, str]]:
        """(subsystem NQN, LV) of each segment whose logical volume grew in this pass."""
        return [
            (seg.nqn, seg.lv)
            for seg in local_segments(self.node, volumes)
            if seg.lv in before and sizes.get(seg.nqn, 0) > before[seg.lv]
        ]

    def _ensure_volumes(
        self,
        volume: Volume,
        existing: dict[str, int],
        snapshots: dict[str, Snapshot],
        errors: dict[str, str],
        sizes: dict[str, int],
        held: dict[str, str],
    ) -> bool:
        """This node's logical volumes of one volume, made or grown (their sizes into
        sizes); False (and each failure in errors) when one is not there yet. One that is
        there but failed to grow stays exported at the size it has (the failure in held):
        a failed grow must never take a volume away from its hosts."""
        ok = True
        for seg in local_segments(self.node, [volume]):
            try:
                origin = None if seg.lv in existing else self._origin(volume, seg, snapshots)
                lv = self.lvm.ensure_volume(self.vg, seg.lv, parse_bytes(seg.segment.size), origin)
                sizes[seg.nqn] = lv.size
            except LvmError as exc:
                if seg.lv in existing:
                    sizes[seg.nqn] = existing[seg.lv]
                    held[seg.nqn] = (
                        f"growing to {seg.segment.size} failed, still serving "
                        f"{format_bytes(existing[seg.lv])}: {exc}"
                    )
                    log.warning("%s: %s", seg.lv, held[seg.nqn])
                    continue
                errors[seg.nqn] = f"logical volume: {exc}"
                ok = False
        return ok

    def _origin(
        self, volume: Volume, seg: LocalSegment, snapshots: dict[str, Snapshot]
    ) -> str | None:
        """The logical volume a new segment starts as a copy of: the source snapshot's thin
        volume, or the source volume's segment, which must be on this node."""
        source = volume.spec.source
        if source is None:
            return None
        key = (seg.segment.index, seg.segment.replica)
        if source.volume:
            return naming.segment_lv(source.volume, *key)
        snapshot = snapshots.get(source.snapshot or "")
        if snapshot is None:
            raise LvmError(f"source Snapshot {source.snapshot} does not exist")
        match = [s for s in snapshot.spec.segments if (s.index, s.replica) == key]
        if not match:
            raise LvmError(f"source Snapshot {source.snapshot} has no segment {key}")
        if match[0].node != self.node:
            raise LvmError(
                f"source Snapshot {source.snapshot} keeps segment {key} on {match[0].node}: "
                "a restored segment must be placed on its snapshot's node"
            )
        return match[0].thin_volume

    def _release(self, volume: Volume, observed: Target) -> bool:
        """A deleted volume: once its exports here are gone (the plan removed them), its
        logical volumes go, then this node's finalizer. False while that is not done."""
        if self.finalizer not in (volume.metadata.finalizers or []):
            return True
        try:
            for seg in volume.spec.segments:
                if seg.node != self.node:
                    continue
                key = (volume.metadata.name, seg.index, seg.replica)
                if naming.subsystem_nqn(*key) in observed.subsystems:
                    return False  # not unexported yet: the next pass goes on
                self.lvm.remove_volume(self.vg, naming.segment_lv(*key))
            self.kube.remove_finalizer(API, "Volume", volume.metadata.name, self.finalizer)
        except (LvmError, KubeError) as exc:  # this volume's failure, not the pass's
            log.warning("volume %s not released yet: %s", volume.metadata.name, exc)
            return False
        return True
