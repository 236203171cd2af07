"""kopf handlers, thin: each hands the object to a reconciler and reports what it did.

A pool is reconciled when it changes, when anything it reads changes (a StorageNode, a
Volume, a Snapshot, a Node's labels, its classes, a heartbeat Lease turning fresh or
stale), and again every `resync` seconds, because a heartbeat goes stale with nothing
changing. Every input comes from the operator's watches (indexes.py, leases.py): a
reconcile reads nothing from the API, and writes only what differs. Level-triggered, so a
restarted operator simply carries on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf

from flashmesh.core import pools, resources
from flashmesh.kube import Kube
from flashmesh.operator import indexes, metrics
from flashmesh.operator.cache import every
from flashmesh.operator.leases import LeaseWatch
from flashmesh.operator.pools import PoolReconciler, volumes_left
from flashmesh.operator.workloads import WorkloadReconciler

GROUP = resources.GROUP
VERSION = resources.VERSION
log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_SECONDS = 2.0  # before a failed reconcile of a watched change is tried again


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str  # the agents' Leases and the operator's own objects
    resync: float = 10.0  # seconds between reconciles of an unchanged pool
    kubeconfig: str | None = None


class Serial:
    """One reconcile per object at a time, and changes coalesced: a change arriving while
    a reconcile of the object already waits to start is left to that one, which reads
    the indexes only once it starts."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._waiting: set[str] = set()

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T | None:
        if key in self._waiting:
            return None
        lock = self._locks[key]
        self._waiting.add(key)
        try:
            await lock.acquire()
        finally:
            self._waiting.discard(key)
        begin, outcome = time.monotonic(), "error"
        try:
            result = await work()
            outcome = "ok"
            return result
        finally:
            lock.release()
            metrics.RECONCILE_SECONDS.labels(self.kind, outcome).observe(time.monotonic() - begin)


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    kube = Kube.from_kubeconfig(config.kubeconfig, user_agent="flashmesh-operator")
    reconciler = PoolReconciler(kube)
    serial = Serial("StoragePool")
    state: dict[str, Any] = {}  # the event loop, the indexes and the Lease watch, once known
    indexes.register(registry)

    def now() -> datetime:
        return datetime.now(UTC)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """In a pod, its service account; elsewhere the kubeconfig in $KUBECONFIG (which
        `flashmesh operator --kubeconfig` sets in its own process)."""
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        settings.persistence.finalizer = pools.FINALIZER
        prefix = "operator.flashmesh.dev"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=prefix)
        settings.posting.enabled = False  # Events are written by the reconcilers, worded
        settings.watching.server_timeout = 60
        loop = asyncio.get_running_loop()
        state["loop"], state["indexes"] = loop, kwargs

        def lease_changed(_: str) -> None:  # from the watch's thread
            asyncio.run_coroutine_threadsafe(reconcile_all(), loop)

        # Listed before any pool is reconciled: no heartbeat looks missing at the start.
        watch = LeaseWatch(kube, config.namespace, lease_changed, now)
        await asyncio.to_thread(watch.start)
        state["leases"] = watch

    @kopf.on.cleanup(registry=registry)
    def stop_watching(**_: Any) -> None:
        if "leases" in state:
            state["leases"].stop()

    async def reconcile(name: str) -> None:
        async def work() -> None:
            seen = indexes.pool_inputs(
                name, state["indexes"], reconciler.recent, state["leases"].renewals()
            )
            if seen is None:
                return
            report = await asyncio.to_thread(reconciler.reconcile, seen)
            metrics.record_pool(name, report.status, report.volume_phases)

        await serial.run(name, work)

    retrying: set[str] = set()

    async def poke(name: str) -> None:
        """A reconcile for a change seen by a watch. kopf retries its own handlers; a
        failed one of these (the API server restarting, say) is tried again shortly, not
        only at the next resync, by one caller at a time."""
        while True:
            try:
                await reconcile(name)
                return
            except Exception as exc:
                log.error("reconcile of StoragePool %s failed: %s; again shortly", name, exc)
                if name in retrying:
                    return
                retrying.add(name)
                try:
                    await asyncio.sleep(min(config.resync, RETRY_SECONDS))
                finally:
                    retrying.discard(name)

    async def reconcile_all() -> None:
        await asyncio.gather(*(poke(n) for n in indexes.pool_names(state["indexes"])))

    @kopf.on.resume(GROUP, VERSION, "storagepools", registry=registry)
    @kopf.on.create(GROUP, VERSION, "storagepools", registry=registry)
    @kopf.on.update(GROUP, VERSION, "storagepools", field="spec", registry=registry)
    async def pool_changed(name: str, **_: Any) -> None:
        await reconcile(name)

    @kopf.timer(GROUP, VERSION, "storagepools", interval=config.resync, registry=registry)
    async def pool_resync(name: str, **_: Any) -> None:
        await reconcile(name)

    @kopf.on.delete(GROUP, VERSION, "storagepools", registry=registry)
    async def pool_deleted(name: str, **kwargs: Any) -> None:
        """The backstop behind the admission policy: a pool still holding volumes keeps
        its finalizer (and its nodes) until they are gone."""
        left = volumes_left(name, list(every(kwargs[indexes.VOLUMES])))
        if left:
            raise kopf.TemporaryError(
                f"StoragePool {name} still holds {len(left)} volume(s) ({', '.join(left[:5])}): "
                "delete their PersistentVolumeClaims first",
                delay=config.resync,
            )
        nodes = indexes.pool_nodes(name, kwargs, reconciler.recent)
        await asyncio.to_thread(reconciler.release_nodes, name, nodes)
        metrics.forget_pool(name)

    # What a pool reads changed: the pools it may concern are reconciled. Listed objects
    # (type None) count too: kopf lists again when a watch's version expired (an API
    # server restarted, say), and what changed meanwhile comes only that way.
    def on_event(*what: str) -> Callable[[Callable[..., Any]], Any]:
        return kopf.on.event(*what, registry=registry)

    @on_event(GROUP, VERSION, "storagenodes")
    @on_event(GROUP, VERSION, "snapshots")
    @on_event("storage.k8s.io", "v1", "storageclasses")
    @on_event("snapshot.storage.k8s.io", "v1", "volumesnapshotclasses")
    async def input_changed(name: str, resource: kopf.Resource, **_: Any) -> None:
        if resource.plural.endswith("classes") and not name.startswith(pools.class_name("")):
            return  # not one of a pool's classes
        await reconcile_all()

    @on_event(GROUP, VERSION, "volumes")
    async def volume_changed(spec: kopf.Spec, **_: Any) -> None:
        pool = spec.get("pool")
        if pool:
            await poke(pool)

    @on_event("apiextensions.k8s.io", "v1", "customresourcedefinitions")
    async def crd_changed(name: str, **_: Any) -> None:
        if name == indexes.SNAPSHOT_CLASS_CRD:
            await reconcile_all()

    seen_labels: dict[str, dict[str, str]] = {}

    @on_event("v1", "nodes")
    async def node_changed(type: str | None, name: str, labels: kopf.Labels, **_: Any) -> None:
        """Only a change of labels matters (Nodes' status changes all the time)."""
        now_labels = {} if type == "DELETED" else dict(labels)
        before = seen_labels.get(name)
        seen_labels[name] = now_labels
        if before is not None and before != now_labels:
            await reconcile_all()

    workload_reconciler = WorkloadReconciler(kube)
    workload_serial = Serial("TrainingWorkload")

    async def reconcile_workload(name: str, namespace: str | None, **kwargs: Any) -> None:
        assert namespace is not None  # a namespaced kind

        async def work() -> None:
            attached = set(kwargs[indexes.ATTACHMENTS])  # by PersistentVolume name
            decision = await asyncio.to_thread(
                workload_reconciler.reconcile, name, namespace, attached
            )
            if decision is not None:
                metrics.record_workload(namespace, name, decision.phase)

        await workload_serial.run(f"{namespace}/{name}", work)

    @kopf.on.resume(GROUP, VERSION, "trainingworkloads", registry=registry)
    @kopf.on.create(GROUP, VERSION, "trainingworkloads", registry=registry)
    @kopf.on.update(GROUP, VERSION, "trainingworkloads", field="spec", registry=registry)
    async def workload_changed(name: str, namespace: str | None, **kwargs: Any) -> None:
        await reconcile_workload(name, namespace, **kwargs)

    @kopf.timer(GROUP, VERSION, "trainingworkloads", interval=config.resync, registry=registry)
    async def workload_resync(name: str, namespace: str | None, **kwargs: Any) -> None:
        await reconcile_workload(name, namespace, **kwargs)

    return registry
