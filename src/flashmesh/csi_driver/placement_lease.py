"""One placement at a time across every FlashMesh controller of the cluster.

Placement reads free space and then writes a Volume; two placements at once could count the
same space twice and overcommit a thin pool (whose volumes then fail writes once it fills).
In one process a lock keeps them apart. Across processes (a controller Deployment with
several replicas, whose sidecars each elect their own leader, so CreateVolume and
ControllerExpand can run in different pods; or several releases sharing the cluster's
Volumes) a coordination.k8s.io Lease does: it is taken for the placement and handed back
after it, with the resourceVersion guarding every change of hands.

The Lease also says who placed last. A controller that placed last knows every placement
(its cache holds its own writes); after another controller placed, its caches may not have
seen that Volume yet, so that one placement counts space from the API server instead.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import grpc

from flashmesh.core.placement import heartbeat_fresh
from flashmesh.csi_driver.errors import CsiError
from flashmesh.kube import Kube, KubeError

log = logging.getLogger(__name__)

API = "coordination.k8s.io/v1"
NAME = "flashmesh-placement"
LAST = "flashmesh.dev/last-placed-by"
# Long enough for any placement (a space count and one Volume write); a holder that died
# holding it delays placements by this much at most.
DURATION_SECONDS = 30
_STAMP = "%Y-%m-%dT%H:%M:%S.%fZ"


def identity() -> str:
    """This process among all controllers: its host (the pod's name) and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class PlacementLease:
    def __init__(
        self, kube: Kube, namespace: str, holder: str | None = None, wait_seconds: float = 60.0
    ) -> None:
        self.kube, self.namespace = kube, namespace
        self.holder = holder or identity()
        self.wait_seconds = wait_seconds
        self._mine: dict[str, Any] | None = None  # the Lease as this controller took it

    @contextmanager
    def held(self) -> Iterator[bool]:
        """Holds the Lease for one placement; yields whether this controller placed last
        (its caches then count every placement)."""
        lease = self._mine = self._acquire()
        last = (lease["metadata"].get("annotations") or {}).get(LAST)
        try:
            yield last in (None, self.holder)
        finally:
            self._release()

    def _acquire(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.wait_seconds
        pause = 0.05
        while True:
            lease = self.kube.get(API, "Lease", NAME, namespace=self.namespace)
            try:
                if lease is None:
                    return self.kube.create(self._body(None))
                if not _held_by_other(lease, self.holder, _now()):
                    return self.kube.replace(self._body(lease))
            except KubeError as exc:
                if exc.status not in (409, 422):  # another controller changed it first
                    raise
            if time.monotonic() >= deadline:
                holder = (lease or {}).get("spec", {}).get("holderIdentity")
                raise CsiError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"another FlashMesh controller ({holder}) has been placing a volume for "
                    f"{self.wait_seconds:.0f} s (Lease {self.namespace}/{NAME}); retry",
                )
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _body(self, lease: dict[str, Any] | None) -> dict[str, Any]:
        now = _now().strftime(_STAMP)
        meta: dict[str, Any] = {"name": NAME, "namespace": self.namespace}
        if lease is not None:
            meta = dict(lease["metadata"])
        spec = {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": DURATION_SECONDS,
            "acquireTime": now,
            "renewTime": now,
        }
        return {"apiVersion": API, "kind": "Lease", "metadata": meta, "spec": spec}

    def _release(self) -> None:
        """Hands the Lease back, naming this controller as the last to place. A failure
        only delays the next placement elsewhere until the Lease runs out."""
        lease, self._mine = self._mine, None
        for _ in range(5):
            try:
                if lease is None:
                    lease = self.kube.get(API, "Lease", NAME, namespace=self.namespace)
                if lease is None or lease["spec"].get("holderIdentity") != self.holder:
                    return  # ran out and taken: the taker reads fresh (we are not its last)
                meta = dict(lease["metadata"])
                meta["annotations"] = {**(meta.get("annotations") or {}), LAST: self.holder}
                spec = {k: v for k, v in lease["spec"].items() if k != "holderIdentity"}
                self.kube.replace({**lease, "metadata": meta, "spec": spec})
                return
            except KubeError as exc:
                if exc.status != 409:
                    log.warning("placement Lease not handed back: %s", exc)
                    return
                lease = None  # changed since it was taken: read it again


def _held_by_other(lease: dict[str, Any], me: str, now: datetime) -> bool:
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    duration = int(spec.get("leaseDurationSeconds") or 0)
    return bool(holder) and holder != me and heartbeat_fresh(spec.get("renewTime"), duration, now)


def _now() -> datetime:
    return datetime.now(UTC)
