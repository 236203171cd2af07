"""One TrainingWorkload reconciled: find its objects, decide (core.workloads), create what
is missing (an object that already exists is never made again), then write the status
and an Event for every object made and every phase reached."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flashmesh.core import resources, serde, workloads
from flashmesh.core.resources import TrainingWorkload
from flashmesh.kube import Kube, KubeError

API = resources.API_VERSION
COMPONENT = "flashmesh-operator"
log = logging.getLogger(__name__)


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in items}


@dataclass
class WorkloadReconciler:
    kube: Kube

    def _event(self, obj: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
        try:
            self.kube.event(obj, reason, message, warning=warning, component=COMPONENT)
        except KubeError as exc:
            log.warning("event %s on %s not written: %s", reason, obj["metadata"]["name"], exc)

    def observe(self, name: str, namespace: str, attached: set[str]) -> workloads.Observed:
        """attached: the PersistentVolumes with a VolumeAttachment (the operator's index)."""
        mine = f"{workloads.WORKLOAD_LABEL}={name}"
        kube = self.kube
        seen = workloads.Observed(
            pvcs=_by_name(kube.list("v1", "PersistentVolumeClaim", namespace, mine)),
            jobs=_by_name(kube.list("batch/v1", "Job", namespace, mine)),
            deployments=_by_name(kube.list("apps/v1", "Deployment", namespace, mine)),
            pods=kube.list("v1", "Pod", namespace, f"{mine},{workloads.STAGE_LABEL}=training"),
        )
        try:
            seen.snapshots = _by_name(
                kube.list(workloads.SNAPSHOT_API, "VolumeSnapshot", namespace, mine)
            )
        except KubeError as exc:
            if exc.status != 404:
                raise  # 404: no snapshot CRDs; the decision waits at the first snapshot
        volumes = {
            (claim.get("spec") or {}).get("volumeName"): claim_name
            for claim_name, claim in seen.pvcs.items()
        }
        seen.attached = {claim for pv, claim in volumes.items() if pv in attached}
        return seen

    def reconcile(self, name: str, namespace: str, attached: set[str]) -> workloads.Decision | None:
        obj = self.kube.get(API, TrainingWorkload.KIND, name, namespace)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None
        workload = TrainingWorkload.from_dict(obj)
        now = _stamp()
        decision = workloads.decide(workload, self.observe(name, namespace, attached), now)
        for new in decision.create:
            kind, new_name = new["kind"], new["metadata"]["name"]
            try:
                self.kube.create(new)
            except KubeError as exc:
                if exc.status == 409:  # made by a pass that ended before its status write
                    continue
                self._event(obj, "CreateFailed", f"{kind} {new_name}: {exc}", warning=True)
                raise
            self._event(obj, "Created", f"{kind} {new_name} created")
        self._write_status(obj, decision, now)
        return decision

    def _write_status(self, obj: dict[str, Any], decision: workloads.Decision, now: str) -> None:
        old = obj.get("status") or {}
        status = decision.status
        status.conditions = workloads.conditions(decision, old.get("conditions") or [], now)
        body = serde.to_dict(status)
        if old.get("phase") != decision.phase:
            failed = decision.phase == "Failed"
            self._event(obj, decision.phase, decision.message, warning=failed)
        if body != old:
            self.kube.patch(
                API, TrainingWorkload.KIND, obj["metadata"]["name"], {"status": body},
                namespace=obj["metadata"]["namespace"], subresource="status",
            )  # fmt: skip
