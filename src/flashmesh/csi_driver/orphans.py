"""Volumes no claim will ever own, collected.

CreateVolume can outlast the provisioner's timeout (the agents are slow, a storage node is
down). If the PVC is then deleted, or the provisioner restarts and forgets the call, the
Volume it asked for stays with no PersistentVolume and nobody ever calls DeleteVolume: its
space stays promised, its segments stay on the storage nodes. So, every few minutes, the
controller looks for Volumes that

- were made for a PVC (CreateVolume records the claim the provisioner names with
  --extra-create-metadata: a volume made outside Kubernetes, by csi-sanity or by hand, is
  never collected),
- are older than the grace (a PV is usually created within seconds of CreateVolume),
- are published to no host and not being deleted,
- have no PersistentVolume of this driver naming them,
- and whose claim is gone (or is another claim of the same name: its UID is not the one
  the volume's name carries),

and deletes them as DeleteVolume would, saying so in its log and a metric.
"""

from __future__ import annotations

import logging
import re
import threading
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter

from flashmesh.core import resources
from flashmesh.core.resources import Volume
from flashmesh.csi_driver.cluster import API, DELETE_CONFIRMED, Cluster
from flashmesh.kube import KubeError

log = logging.getLogger(__name__)

# The claim a volume was made for, "<namespace>/<name>", from CreateVolume's parameters.
CLAIM = f"{resources.GROUP}/claim"
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
EVERY_SECONDS = 600.0
GRACE_SECONDS = 600.0
# external-provisioner names a volume <prefix>-<claim UID>.
_UID = re.compile(r"-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")

COLLECTED = Counter(
    "flashmesh_controller_orphan_volumes_deleted_total",
    "Volumes deleted because no PersistentVolume names them and their PVC is gone",
)


def claim_of(parameters: dict[str, str]) -> str | None:
    """The claim CreateVolume was called for, "<namespace>/<name>", if the provisioner said."""
    name, namespace = parameters.get(PVC_NAME), parameters.get(PVC_NAMESPACE)
    return f"{namespace}/{name}" if name and namespace else None


class OrphanCollector:
    def __init__(
        self,
        cluster: Cluster,
        every_seconds: float = EVERY_SECONDS,
        grace_seconds: float = GRACE_SECONDS,
    ) -> None:
        self.cluster = cluster
        self.every_seconds, self.grace_seconds = every_seconds, grace_seconds

    def start(self) -> threading.Event:
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(self.every_seconds):
                try:
                    self.collect()
                except Exception:  # the next round tries again
                    log.exception("looking for orphaned volumes failed")

        threading.Thread(target=run, name="orphan-volumes", daemon=True).start()
        return stop

    def collect(self, now: datetime | None = None) -> list[str]:
        """One round; the Volumes deleted."""
        now = now or datetime.now(UTC)
        candidates = [v for v in self.cluster.volumes() if self._candidate(v, now)]
        if not candidates:
            return []
        kube = self.cluster.kube
        named = {
            ((pv.get("spec") or {}).get("csi") or {}).get("volumeHandle")
            for pv in kube.list("v1", "PersistentVolume")
            if ((pv.get("spec") or {}).get("csi") or {}).get("driver") == resources.CSI_DRIVER
        }
        deleted = []
        for volume in candidates:
            vid = volume.metadata.name
            if vid in named or self._claim_lives(volume):
                continue
            claim = (volume.metadata.annotations or {})[CLAIM]
            log.warning(
                "volume %s (%s) has no PersistentVolume and its claim %s is gone: deleting it",
                vid, volume.spec.csi_name, claim,
            )  # fmt: skip
            try:
                kube.patch(API, "Volume", vid, {"metadata": {"annotations": {
                    DELETE_CONFIRMED: "orphan"}}})  # fmt: skip
                kube.delete(API, "Volume", vid)
            except KubeError as exc:
                log.warning("orphaned volume %s not deleted: %s", vid, exc)
                continue
            COLLECTED.inc()
            deleted.append(vid)
        return deleted

    def _candidate(self, volume: Volume, now: datetime) -> bool:
        meta = volume.metadata
        if CLAIM not in (meta.annotations or {}) or meta.deletion_timestamp or volume.spec.hosts:
            return False
        made = _time(meta.creation_timestamp)
        return made is not None and now - made >= timedelta(seconds=self.grace_seconds)

    def _claim_lives(self, volume: Volume) -> bool:
        namespace, name = (volume.metadata.annotations or {})[CLAIM].split("/", 1)
        pvc = self.cluster.kube.get("v1", "PersistentVolumeClaim", name, namespace)
        if pvc is None:
            return False
        uid = _UID.search(volume.spec.csi_name)
        # A claim of the same name made since is another claim: not this volume's owner.
        return uid is None or pvc["metadata"].get("uid") == uid.group(1)


def _time(stamp: str | None) -> datetime | None:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None
