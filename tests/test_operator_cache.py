"""A pool reconciled from the operator's indexes: it reads nothing from the API, writes only
what differs, and a write the watch has not brought back yet is not done (nor announced)
twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from flashmesh.core import naming, resources
from flashmesh.operator import indexes
from flashmesh.operator.cache import Recent
from flashmesh.operator.leases import LeaseWatch, Renewal
from flashmesh.operator.pools import PoolReconciler

API = resources.API_VERSION
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def obj(kind: str, name: str, rv: str, **rest: Any) -> dict[str, Any]:
    meta = {"name": name, "resourceVersion": rv, "uid": f"u-{name}"}
    return {"apiVersion": API, "kind": kind, "metadata": meta, **rest}


class RecordingKube:
    """Answers writes as the API server would; any read fails the test."""

    def __init__(self, seen: dict[str, Any]) -> None:
        self.objects = {(o["kind"], o["metadata"]["name"]): o
                        for i in (indexes.POOLS, indexes.NODES)
                        for store in seen[i].values() for o in store}  # fmt: skip
        self.writes: list[tuple[str, str, str]] = []
        self.events: list[str] = []
        self.version = 100

    def _answer(self, kind: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        new = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.version)}}
        self.objects[(kind, name)] = new
        return new

    def patch(self, api: str, kind: str, name: str, patch: dict[str, Any], **kw: Any) -> Any:
        self.writes.append(("patch", kind, name))
        old = self.objects[(kind, name)]
        return self._answer(
            kind, name, {**old, **{k: {**old.get(k, {}), **v} for k, v in patch.items()}}
        )

    def create(self, desired: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(("create", desired["kind"], desired["metadata"]["name"]))
        return self._answer(desired["kind"], desired["metadata"]["name"], desired)

    def event(self, target: dict[str, Any], reason: str, message: str, **kw: Any) -> None:
        self.events.append(reason)

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a reconcile called Kube.{name}")


def index(objects: dict[Any, Any]) -> dict[Any, list[Any]]:
    return {key: [value] for key, value in objects.items()}


def cluster() -> dict[str, Any]:
    node_status = {
        "phase": "Ready",
        "volumeGroup": {"name": "vg", "size": "1Gi", "free": "1Gi",
                        "thinPool": {"name": "thin", "size": "1Gi"}},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Heartbeat"}],
    }  # fmt: skip
    spec = {"nodeSelector": {"matchLabels": {"tier": "a"}}, "transports": ["tcp"]}
    return {
        indexes.POOLS: index({"p": obj("StoragePool", "p", "1", spec=spec, status={})}),
        indexes.NODES: index({"n1": obj("StorageNode", "n1", "2", spec={}, status=node_status)}),
        indexes.VOLUMES: {},
        indexes.SNAPSHOTS: {},
        indexes.NODE_LABELS: index({"n1": {"tier": "a"}}),
        indexes.CLASSES["StorageClass"]: {},
        indexes.CLASSES["VolumeSnapshotClass"]: {},
        indexes.SNAPSHOT_API: {},
    }


def fresh_leases() -> dict[str, Renewal]:
    stamp = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {naming.node_lease("n1"): (stamp, 3600)}


def test_a_write_the_watch_has_not_shown_yet_is_not_done_twice() -> None:
    seen = cluster()
    kube = RecordingKube(seen)
    reconciler = PoolReconciler(kube)  # type: ignore[arg-type]
    first = indexes.pool_inputs("p", seen, reconciler.recent, fresh_leases())
    assert first is not None
    reconciler.reconcile(first)
    assert sorted(kube.writes) == [("create", "StorageClass", "flashmesh-p"),
                                   ("patch", "StorageNode", "n1"),
                                   ("patch", "StoragePool", "p")]  # fmt: skip
    assert kube.events.count("NodeJoined") == 1
    # The indexes still show everything as it was: nothing is written or announced again.
    kube.writes.clear(), kube.events.clear()
    again = indexes.pool_inputs("p", seen, reconciler.recent, fresh_leases())
    assert again is not None
    reconciler.reconcile(again)
    assert (kube.writes, kube.events) == ([], [])


def test_recent_writes_give_way_to_the_index_once_it_moved_on() -> None:
    recent = Recent()
    before = obj("StoragePool", "p", "1")
    recent.wrote(("StoragePool", "p"), "1", obj("StoragePool", "p", "2", status={"a": 1}))
    recent.wrote(("StoragePool", "p"), "2", obj("StoragePool", "p", "3", status={"a": 2}))
    assert (recent.latest(("StoragePool", "p"), before) or {})["status"] == {"a": 2}
    # Someone else's later write (or ours, come back): the index is the latest again.
    later = obj("StoragePool", "p", "7", status={"a": 9})
    assert recent.latest(("StoragePool", "p"), later) == later
    assert recent.latest(("StoragePool", "p"), before) == before
    # A created object the index has not shown yet.
    made = obj("StorageClass", "c", "5")
    recent.wrote(("StorageClass", "c"), None, made)
    assert recent.latest(("StorageClass", "c"), None) == made


def lease(name: str, renew: str, seconds: int) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"},
            "spec": {"renewTime": renew, "leaseDurationSeconds": seconds}}  # fmt: skip


def test_only_a_lease_turning_fresh_or_stale_is_a_change() -> None:
    changed: list[str] = []
    watch = LeaseWatch(None, "ns", changed.append, lambda: NOW)  # type: ignore[arg-type]
    stamp = NOW.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    watch._compare("ns/a", None, lease("a", stamp, 10))  # seen fresh
    watch._compare("ns/a", lease("a", stamp, 10), lease("a", stamp, 20))  # renewed: still fresh
    watch._compare("ns/a", lease("a", stamp, 20), None)  # gone
    old = (NOW - timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    watch._compare("ns/b", None, lease("b", old, 10))  # already stale when first seen
    assert changed == ["a", "a"]
