"""What the node plugin writes on Volumes: the replica records of a mirrored Volume, read
from and written to its status by the node that has it staged (server-side apply, as this
node's own field manager, so the agents' segment entries are never touched), and Events."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from flashmesh.core import mirrors, resources

API = resources.API_VERSION
log = logging.getLogger(__name__)
REASONS = {"True": "InSync", "False": "Degraded"}


class ReplicaStatus:
    """The Kubernetes client is made on first use (the plugin starts faster without it)."""

    def __init__(self, kubeconfig: str | None, host_nqn: str) -> None:
        self.kubeconfig = kubeconfig
        self.manager = f"flashmesh-node-{host_nqn.rsplit(':', 1)[-1]}"[:128]
        self._kube: Any = None

    def _client(self) -> Any:
        if self._kube is None:
            from flashmesh.kube import Kube

            self._kube = Kube.from_kubeconfig(self.kubeconfig, user_agent="flashmesh-csi-node")
        return self._kube

    def read(self, vid: str) -> tuple[dict[mirrors.Key, mirrors.ReplicaRecord], dict[str, Any]]:
        """The recorded replicas, and the Volume object (None when it is gone)."""
        found = self._client().get(API, "Volume", vid) or {}
        status = found.get("status") or {}
        return mirrors.records_from_status(status.get("replicas")), found

    def write(
        self, vid: str, records: dict[mirrors.Key, mirrors.ReplicaRecord], volume: dict[str, Any]
    ) -> None:
        nodes = {
            (int(s["index"]), int(s["replica"])): str(s["node"])
            for s in (volume.get("spec") or {}).get("segments") or []
        }
        status, message = mirrors.condition(records, nodes)
        reason = REASONS[status]
        if status == "False" and all(
            r.state == mirrors.RECOVERING for r in records.values() if not r.in_sync
        ):
            reason = "Resyncing"
        before: dict[str, Any] = next(
            (c for c in (volume.get("status") or {}).get("conditions") or []
             if c.get("type") == mirrors.CONDITION), {},
        )  # fmt: skip
        since = before.get("lastTransitionTime") if before.get("status") == status else None
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._client().apply_status(
            {
                "apiVersion": API, "kind": "Volume", "metadata": {"name": vid},
                "status": {
                    "replicas": mirrors.to_status(records),
                    "conditions": [{"type": mirrors.CONDITION, "status": status,
                                    "reason": reason, "message": message,
                                    "lastTransitionTime": since or now}],
                },
            },
            self.manager,
        )  # fmt: skip

    def event(self, vid: str, reason: str, message: str) -> None:
        """A Warning Event on the Volume (best effort: the stage goes on without it)."""
        try:
            found = self._client().get(API, "Volume", vid)
            if found:
                self._client().event(found, reason, message, warning=True,
                                     component="flashmesh-csi-node")  # fmt: skip
        except Exception as exc:  # an Event is never worth failing a stage over
            log.warning("volume %s: Event %s not written: %s", vid, reason, exc)
