"""kopf handlers, thin: each hands the object to a reconciler and reports what it did.

A pool is reconciled when it changes and again every `resync` seconds, because what it
reports (heartbeats going stale, nodes and volumes coming and going) changes without the
pool changing: level-triggered, so a restarted operator simply carries on."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import kopf

from flashmesh.core import pools, resources
from flashmesh.kube import Kube
from flashmesh.operator import metrics
from flashmesh.operator.pools import PoolReconciler
from flashmesh.operator.workloads import WorkloadReconciler

GROUP = resources.GROUP
VERSION = resources.VERSION
log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str  # the agents' Leases and the operator's own objects
    resync: float = 10.0  # seconds between reconciles of an unchanged pool
    kubeconfig: str | None = None


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    kube = Kube.from_kubeconfig(config.kubeconfig)
    reconciler = PoolReconciler(kube, config.namespace)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """In a pod, its service account; elsewhere the kubeconfig in $KUBECONFIG (which
        `flashmesh operator --kubeconfig` sets in its own process)."""
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = pools.FINALIZER
        prefix = "operator.flashmesh.dev"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=prefix)
        settings.posting.enabled = False  # Events are written by the reconcilers, worded
        settings.watching.server_timeout = 60

    # kopf runs a pool's timer and its change handlers concurrently (in threads): one
    # reconcile of a pool at a time, so a change is decided and announced once.
    locks: dict[str, threading.Lock] = defaultdict(threading.Lock)

    def one_at_a_time(kind: str, key: str, work: Callable[[], T]) -> T:
        """work under the object's lock, its duration observed by kind and outcome."""
        begin = time.monotonic()
        outcome = "error"
        try:
            with locks[key]:
                result = work()
            outcome = "ok"
            return result
        finally:
            metrics.RECONCILE_SECONDS.labels(kind, outcome).observe(time.monotonic() - begin)

    def reconcile(body: kopf.Body) -> None:
        name = body["metadata"]["name"]
        report = one_at_a_time("StoragePool", name, lambda: reconciler.reconcile(name))
        if report is not None:
            metrics.record_pool(name, report.status, report.volume_phases)

    @kopf.on.resume(GROUP, VERSION, "storagepools", registry=registry)
    @kopf.on.create(GROUP, VERSION, "storagepools", registry=registry)
    @kopf.on.update(GROUP, VERSION, "storagepools", field="spec", registry=registry)
    def pool_changed(body: kopf.Body, **_: Any) -> None:
        reconcile(body)

    @kopf.timer(GROUP, VERSION, "storagepools", interval=config.resync, registry=registry)
    def pool_resync(body: kopf.Body, **_: Any) -> None:
        reconcile(body)

    @kopf.on.delete(GROUP, VERSION, "storagepools", registry=registry)
    def pool_deleted(body: kopf.Body, **_: Any) -> None:
        """The backstop behind the admission policy: a pool still holding volumes keeps
        its finalizer (and its nodes) until they are gone."""
        name = body["metadata"]["name"]
        left = reconciler.volumes_left(name)
        if left:
            raise kopf.TemporaryError(
                f"StoragePool {name} still holds {len(left)} volume(s) ({', '.join(left[:5])}): "
                "delete their PersistentVolumeClaims first",
                delay=config.resync,
            )
        reconciler.release_nodes(dict(body))
        metrics.forget_pool(name)

    workload_reconciler = WorkloadReconciler(kube)

    def reconcile_workload(body: kopf.Body) -> None:
        name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        decision = one_at_a_time(
            "TrainingWorkload",
            f"{namespace}/{name}",
            lambda: workload_reconciler.reconcile(name, namespace),
        )
        if decision is not None:
            metrics.record_workload(namespace, name, decision.phase)

    @kopf.on.resume(GROUP, VERSION, "trainingworkloads", registry=registry)
    @kopf.on.create(GROUP, VERSION, "trainingworkloads", registry=registry)
    @kopf.on.update(GROUP, VERSION, "trainingworkloads", field="spec", registry=registry)
    def workload_changed(body: kopf.Body, **_: Any) -> None:
        reconcile_workload(body)

    @kopf.timer(GROUP, VERSION, "trainingworkloads", interval=config.resync, registry=registry)
    def workload_resync(body: kopf.Body, **_: Any) -> None:
        reconcile_workload(body)

    return registry
