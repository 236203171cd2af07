"""The agents' heartbeat Leases in the operator's namespace, kept by a LIST and then a watch.

An informer (flashmesh.informer), not a kopf index: kopf running cluster-wide watches a
namespaced kind in every namespace, and the operator may read Leases in its own namespace
only (every kubelet's Lease elsewhere would stream to it besides). The informer resumes
from the last resourceVersion it saw after the server ends the watch or goes away; only an
expired version (410) makes it list again."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from flashmesh.core.placement import heartbeat_fresh
from flashmesh.informer import Informer, start_all
from flashmesh.kube import Kube

API = "coordination.k8s.io/v1"

Renewal = tuple[str | None, int]  # renewTime, leaseDurationSeconds


def renewal(lease: dict[str, Any]) -> Renewal:
    spec = lease.get("spec") or {}
    return spec.get("renewTime"), int(spec.get("leaseDurationSeconds") or 0)


def fresh(found: Renewal | None, now: datetime) -> bool:
    return found is not None and heartbeat_fresh(found[0], found[1], now)


class LeaseWatch:
    """changed(lease name) is called, from the watch's thread, when a Lease turns fresh or
    stale by a change (one going stale with nothing changing is the resync timer's)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        changed: Callable[[str], None],
        now: Callable[[], datetime],
    ) -> None:
        self.changed, self.now = changed, now
        self._leases = Informer(kube, API, "Lease", namespace)
        self._leases.add_listener(self._compare)

    def renewals(self) -> dict[str, Renewal]:
        return {o["metadata"]["name"]: renewal(o) for o in self._leases.items()}

    def start(self, timeout: float = 60.0) -> None:
        """Lists once (so the first reconcile knows every heartbeat), then watches."""
        start_all([self._leases], timeout)

    def stop(self) -> None:
        self._leases.stop()

    def _compare(self, key: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        now = self.now()
        before = renewal(old) if old is not None else None
        after = renewal(new) if new is not None else None
        if fresh(before, now) != fresh(after, now):
            self.changed(key.rsplit("/", 1)[-1])  # the informer's key is namespace/name
