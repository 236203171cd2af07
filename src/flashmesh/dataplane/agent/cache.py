"""What the agent watches: only what concerns its node, cached, and which changes wake it.

Volumes and Snapshots are watched through the node's label (`naming.node_label`), which
the CSI controller sets on every object with a segment here, so the API server sends this
node nothing about the others. StorageNodes, StoragePools and CSINodes are watched whole
(one object per node or pool: host NQN claims and the pool's drive rules), and the
DH-HMAC-CHAP key Secrets of FlashMesh's namespace by their label.

A change wakes the agent's loop only when it can change what the node must do: a spec,
labels, finalizers or deletion; another node's host NQN; someone else's edit of this
node's status. The agent's own writes come back as watch events and are told apart by the
resourceVersion each write returned.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from flashmesh.core import naming, resources
from flashmesh.dataplane.host_keys import KEY_LABEL
from flashmesh.informer import Informer, Obj, start_all

API = resources.API_VERSION
OWN_WRITES_KEPT = 4096


def _meta(obj: Obj | None) -> dict[str, Any]:
    return (obj or {}).get("metadata") or {}


def _shape(obj: Obj | None) -> tuple[Any, ...]:
    """What of an object's metadata and spec decides the node's work (not its status)."""
    meta = _meta(obj)
    return (
        meta.get("generation"),
        meta.get("deletionTimestamp"),
        tuple(meta.get("finalizers") or ()),
        tuple(sorted((meta.get("labels") or {}).items())),
        repr((obj or {}).get("spec")),
    )


class AgentCache:
    """The agent's informers, and the event its loop sleeps on."""

    def __init__(self, kube: Any, node: str, namespace: str) -> None:
        self.node = node
        label = naming.node_label(node)
        self.volumes = Informer(kube, API, "Volume", label_selector=label)
        self.snapshots = Informer(kube, API, "Snapshot", label_selector=label)
        self.storage_nodes = Informer(kube, API, "StorageNode")
        self.pools = Informer(kube, API, "StoragePool")
        self.csinodes = Informer(kube, "storage.k8s.io/v1", "CSINode")
        self.secrets = Informer(kube, "v1", "Secret", namespace, f"{KEY_LABEL}=true")
        self.informers = [
            self.volumes,
            self.snapshots,
            self.storage_nodes,
            self.pools,
            self.csinodes,
            self.secrets,
        ]
        self.wake = threading.Event()
        self._own: deque[str] = deque(maxlen=OWN_WRITES_KEPT)
        self._own_set: set[str] = set()
        self._lock = threading.Lock()
        self._listen(self.volumes, _shape)
        self._listen(self.snapshots, _shape)
        self._listen(self.pools, _shape)
        self._listen(self.csinodes, _shape)
        self._listen(self.secrets, lambda o: (_meta(o).get("resourceVersion"),))
        self._listen(self.storage_nodes, self._node_shape)

    # --- filling --------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Watches everything; returns once every cache holds its first list."""
        start_all(self.informers, timeout)

    def fill(self) -> None:
        """One list of each, with no watch: for a single pass (`agent --once`)."""
        for informer in self.informers:
            informer.fill()

    # --- the agent's own writes -------------------------------------------------------------

    def wrote(self, obj: Obj | None) -> None:
        """Records the resourceVersion an own write returned: its watch event wakes no one."""
        version = _meta(obj).get("resourceVersion")
        if not version:
            return
        with self._lock:
            if len(self._own) == self._own.maxlen:
                self._own_set.discard(self._own[0])
            self._own.append(version)
            self._own_set.add(version)

    def _is_own(self, obj: Obj | None) -> bool:
        with self._lock:
            return _meta(obj).get("resourceVersion") in self._own_set

    # --- which changes matter -----------------------------------------------------------------

    def _node_shape(self, obj: Obj | None) -> tuple[Any, ...]:
        if _meta(obj).get("name") == self.node:
            # This node: its spec, and its status as someone else (the operator marking
            # it stale) left it; own status writes are recognised by their version.
            return (*_shape(obj), repr((obj or {}).get("status")))
        return (*_shape(obj), ((obj or {}).get("status") or {}).get("hostNQN"))

    def _listen(self, informer: Informer, shape: Callable[[Obj | None], tuple[Any, ...]]) -> None:
        def changed(key: str, old: Obj | None, new: Obj | None) -> None:
            if new is not None and self._is_own(new):
                return
            if old is None or new is None or shape(old) != shape(new):
                self.wake.set()

        informer.add_listener(changed)

    # --- reads ------------------------------------------------------------------------------

    def storage_node(self) -> Obj | None:
        return self.storage_nodes.get(self.node)

    def pool(self, name: str | None) -> Obj | None:
        return self.pools.get(name) if name else None
