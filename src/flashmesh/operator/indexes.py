"""The operator's kopf indexes: every object a reconcile reads, kept by kopf's watches (one
per kind, listed once), and the plain inputs of one pool's reconcile taken from them.

Read them on kopf's event loop only (kopf changes them there): a reconcile gets copies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from flashmesh.core import pools, resources
from flashmesh.core.resources import Snapshot, Volume
from flashmesh.operator.cache import Recent, every, one, plain
from flashmesh.operator.leases import Renewal
from flashmesh.operator.pools import PoolInputs

GROUP, VERSION = resources.GROUP, resources.VERSION
SNAPSHOT_CLASS_CRD = "volumesnapshotclasses.snapshot.storage.k8s.io"
# Index names: handlers get each index as the keyword argument of that name.
POOLS, NODES, VOLUMES, SNAPSHOTS = "fm_pools", "fm_storagenodes", "fm_volumes", "fm_snapshots"
NODE_LABELS, SNAPSHOT_API, ATTACHMENTS = "fm_node_labels", "fm_snapshot_api", "fm_attachments"
CLASSES = {"StorageClass": "fm_storageclasses", "VolumeSnapshotClass": "fm_snapshotclasses"}

Indexes = Mapping[str, Any]  # index name -> kopf.Index


def register(registry: kopf.OperatorRegistry) -> None:
    def by_name(name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {name: plain(body)}

    for plural, index in (("storagepools", POOLS), ("storagenodes", NODES)):
        kopf.index(GROUP, VERSION, plural, id=index, registry=registry)(by_name)

    # Volumes and Snapshots are many: parsed once per change, not once per reconcile.
    @kopf.index(GROUP, VERSION, "volumes", id=VOLUMES, registry=registry)
    def volumes(name: str, body: kopf.Body, **_: Any) -> dict[str, Volume]:
        return {name: Volume.from_dict(plain(body))}

    @kopf.index(GROUP, VERSION, "snapshots", id=SNAPSHOTS, registry=registry)
    def snapshots(name: str, body: kopf.Body, **_: Any) -> dict[str, Snapshot]:
        return {name: Snapshot.from_dict(plain(body))}

    @kopf.index("v1", "nodes", id=NODE_LABELS, registry=registry)
    def node_labels(name: str, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, str]]:
        return {name: dict(labels)}

    def ours(name: str, **_: Any) -> bool:
        return name.startswith(pools.class_name(""))

    def class_of(kind: str) -> Any:
        def index(name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Any]:
            return {(kind, name): plain(body)}

        return index

    for group, plural, kind in (
        ("storage.k8s.io", "storageclasses", "StorageClass"),
        ("snapshot.storage.k8s.io", "volumesnapshotclasses", "VolumeSnapshotClass"),
    ):
        kopf.index(group, "v1", plural, id=CLASSES[kind], when=ours, registry=registry)(
            class_of(kind)
        )

    @kopf.index(
        "apiextensions.k8s.io", "v1", "customresourcedefinitions", id=SNAPSHOT_API,
        when=lambda name, **_: name == SNAPSHOT_CLASS_CRD, registry=registry,
    )  # fmt: skip
    def snapshot_api(name: str, **_: Any) -> dict[str, bool]:
        return {name: True}

    @kopf.index("storage.k8s.io", "v1", "volumeattachments", id=ATTACHMENTS, registry=registry)
    def attachments(spec: kopf.Spec, name: str, **_: Any) -> dict[str, str]:
        pv = (spec.get("source") or {}).get("persistentVolumeName")
        return {pv: name} if pv else {}


def pool_inputs(
    name: str, indexes: Indexes, recent: Recent, renewals: dict[str, Renewal]
) -> PoolInputs | None:
    """The inputs of one pool's reconcile; None when the pool is gone or going (its
    deletion lets its nodes go: a reconcile then would take them back)."""
    pool = recent.latest(("StoragePool", name), one(indexes[POOLS], name))
    if pool is None or pool["metadata"].get("deletionTimestamp"):
        return None
    nodes = [recent.latest(("StorageNode", n), one(indexes[NODES], n)) for n in indexes[NODES]]
    labels = indexes[NODE_LABELS]
    class_name = pools.class_name(name)
    classes = {
        kind: recent.latest((kind, class_name), one(indexes[index], (kind, class_name)))
        for kind, index in CLASSES.items()
    }
    return PoolInputs(
        pool=pool,
        nodes=[n for n in nodes if n is not None],
        volumes=list(every(indexes[VOLUMES])),
        snapshots=list(every(indexes[SNAPSHOTS])),
        node_labels={n: one(labels, n) for n in labels},
        renewals=renewals,
        classes=classes,
        snapshot_classes=SNAPSHOT_CLASS_CRD in indexes[SNAPSHOT_API],
    )


def pool_nodes(name: str, indexes: Indexes, recent: Recent) -> list[dict[str, Any]]:
    """The StorageNodes of a pool, as latest known."""
    nodes = (recent.latest(("StorageNode", n), one(indexes[NODES], n)) for n in indexes[NODES])
    return [n for n in nodes if n is not None and (n.get("spec") or {}).get("pool") == name]


def pool_names(indexes: Indexes) -> list[str]:
    return list(indexes[POOLS])
