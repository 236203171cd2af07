"""What the CSI controller watches, cached: Volumes, Snapshots, StorageNodes and
StoragePools (cluster-wide), CSINodes, and the agents' Leases in FlashMesh's namespace.

Calls read these caches, so a controller at rest asks the API server nothing and a call
costs no LIST. Two things the caches alone do not give, and this module adds:

- Waking waits: a call waiting for agents sleeps on one condition that the Volume and
  Snapshot informers notify on every change, and re-reads its predicate from the cache.
- Reading its own writes: a write returns before its watch event arrives, so a placement
  that released its lock right after creating a Volume would let the next placement count
  the same free space again. `observe` holds the writer until the cache has seen the
  version its write returned (bounded), and puts the written object in if the watch is
  late (`Informer.assume`).
"""

from __future__ import annotations

import logging
import threading
import time

from flashmesh.core import resources
from flashmesh.informer import Informer, Obj, key_of, start_all
from flashmesh.kube import Kube

log = logging.getLogger(__name__)

API = resources.API_VERSION
# How long a writer waits for its write's watch event before putting it in the cache
# itself; the event takes milliseconds while the watch is up.
OBSERVE_SECONDS = 10.0


class ControllerCache:
    def __init__(self, kube: Kube, namespace: str) -> None:
        self.volumes = Informer(kube, API, "Volume")
        self.snapshots = Informer(kube, API, "Snapshot")
        self.storage_nodes = Informer(kube, API, "StorageNode")
        self.pools = Informer(kube, API, "StoragePool")
        self.csinodes = Informer(kube, "storage.k8s.io/v1", "CSINode")
        # Only the agents' Leases: they live in FlashMesh's namespace.
        self.leases = Informer(kube, "coordination.k8s.io/v1", "Lease", namespace)
        self.informers = [
            self.volumes,
            self.snapshots,
            self.storage_nodes,
            self.pools,
            self.csinodes,
            self.leases,
        ]
        self._changed = threading.Condition()
        self._changes = 0
        # Waits are for agents' reports, which land on Volumes and Snapshots.
        self.volumes.add_listener(self._tell)
        self.snapshots.add_listener(self._tell)

    def start(self, timeout: float = 60.0) -> None:
        """Watches everything; returns once every cache holds its first list."""
        start_all(self.informers, timeout)

    def stop(self) -> None:
        for informer in self.informers:
            informer.stop()

    @property
    def synced(self) -> bool:
        return all(i.synced for i in self.informers)

    # --- waking waits ---------------------------------------------------------------------

    def _tell(self, key: str, old: Obj | None, new: Obj | None) -> None:
        with self._changed:
            self._changes += 1
            self._changed.notify_all()

    def changes(self) -> int:
        """A counter of Volume and Snapshot changes: read it before evaluating a predicate,
        then `wait_change` from it, and no change in between is missed."""
        with self._changed:
            return self._changes

    def wait_change(self, since: int, timeout: float) -> None:
        """Returns once a Volume or Snapshot changed after `since`, or after timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._changes == since:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)

    # --- own writes ---------------------------------------------------------------------------

    def informer_of(self, obj: Obj) -> Informer:
        kind = obj.get("kind")
        return next(i for i in self.informers if i.kind == kind)

    def observe(self, written: Obj, timeout: float = OBSERVE_SECONDS) -> None:
        """Returns once the cache reflects a write that returned `written`: its watch
        event arrived (the usual case, milliseconds), or the watch is late and the object
        was put in the cache directly so that the next read counts it anyway."""
        informer = self.informer_of(written)
        key = key_of(written)
        version = str((written.get("metadata") or {}).get("resourceVersion") or "")
        if not version or informer.wait_seen(key, version, timeout):
            return
        if informer.assume(written):
            log.warning(
                "%s %s: no watch event for version %s after %.0f s; cached from the write",
                informer.kind, key, version, timeout,
            )  # fmt: skip
