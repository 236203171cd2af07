"""The storage agent (`flashmesh agent --node NAME`): one per storage node.

A level-triggered loop, safe to kill at any instant: each pass reads the node's drives, its
StorageNode and pool, and every Volume, then makes the node match — the pool's volume
group and thin pool on the drives the pool selects, one thin logical volume and one nvmet
subsystem per local segment, allowed to exactly the volume's hosts — and reports: each
segment's export in its Volume's status (server-side apply, so agents on different nodes
own their own entries) and the node's inventory, endpoints and heartbeat in its
StorageNode. A Volume being deleted keeps this agent's finalizer until its exports and
logical volumes here are gone. A drive the pool did not select is never touched.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flashmesh.core import naming, resources, serde
from flashmesh.core.drives import BlockDevice, select_drives
from flashmesh.core.resources import Condition, Endpoint, StorageNode, StoragePool, Volume
from flashmesh.core.units import format_bytes, parse_bytes
from flashmesh.dataplane import process, rdma
from flashmesh.dataplane.inventory import inventory
from flashmesh.dataplane.lvm import THIN_POOL, Lvm, LvmError
from flashmesh.dataplane.process import CommandError, Runner
from flashmesh.dataplane.target import configfs
from flashmesh.dataplane.target.desired import desired_target, local_segments, segment_statuses
from flashmesh.dataplane.target.planner import plan
from flashmesh.kube import Kube, KubeError

log = logging.getLogger(__name__)
API = resources.API_VERSION
NVME_PORT = 4420
KEY_LABEL = f"{resources.GROUP}/dhchap-key"
HOST_NQN_ANNOTATION = f"{resources.GROUP}/host-nqn"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Agent:
    kube: Kube
    node: str
    address: str
    port: int = NVME_PORT
    nvmet_root: Path = configfs.NVMET_ROOT
    runner: Runner = process.run
    # Where the DH-HMAC-CHAP host keys live (Secrets labelled KEY_LABEL).
    namespace: str = "flashmesh-system"
    _said: dict[str, str] = field(default_factory=dict)

    @property
    def finalizer(self) -> str:
        return f"{resources.GROUP}/agent-{self.node}"

    @property
    def manager(self) -> str:
        return f"flashmesh-agent-{self.node}"

    # --- the loop ---------------------------------------------------------------------

    def run_forever(self, interval: float = 2.0) -> None:
        while True:
            try:
                self.reconcile()
            except Exception:  # keep serving; the next pass starts from what is there
                log.exception("reconcile pass failed")
            time.sleep(interval)

    def reconcile(self) -> None:
        node_obj = self._storage_node()
        node = StorageNode.from_dict(node_obj)
        pool = self._pool(node.spec.pool)
        devices = inventory(self.runner)
        ports = rdma.discover()
        endpoints = self._endpoints(ports, pool)
        # nvmet and a target driver per transport served (no-ops once loaded).
        modules = ["nvmet", *(f"nvmet-{e.transport}" for e in endpoints)]
        process.check(self.runner, ["modprobe", "-a", *modules])
        conditions: list[Condition] = []
        lvm = Lvm(self.runner)
        vg_name = naming.pool_volume_group(pool.metadata.name) if pool else None
        selected: set[str] = set()
        if pool and vg_name:
            selected = self._prepare_drives(node_obj, pool, devices, lvm, vg_name, conditions)
        volumes = [Volume.from_dict(v) for v in self.kube.list(API, "Volume")]
        if vg_name and lvm.volume_group(vg_name) is not None:
            keys = self._host_keys() if pool and pool.spec.security.dhchap else None
            self._reconcile_volumes(volumes, lvm, vg_name, endpoints, keys)
        self._report_node(node_obj, devices, selected, lvm, vg_name, endpoints, ports, conditions)

    # --- pieces -----------------------------------------------------------------------

    def _storage_node(self) -> dict[str, Any]:
        found = self.kube.get(API, "StorageNode", self.node)
        if found is None:
            log.info("registering StorageNode %s", self.node)
            found = self.kube.create(
                {"apiVersion": API, "kind": "StorageNode", "metadata": {"name": self.node}}
            )
        return found

    def _pool(self, name: str | None) -> StoragePool | None:
        data = self.kube.get(API, "StoragePool", name) if name else None
        return StoragePool.from_dict(data) if data else None

    def _endpoints(self, ports: list[rdma.Port], pool: StoragePool | None) -> list[Endpoint]:
        """tcp always; rdma when an active RDMA port carries the node's fabric address."""
        can = ["tcp"]
        if rdma.port_for_address(ports, self.address) is not None:
            can.append("rdma")
        wanted = pool.spec.transports if pool else can
        return [Endpoint(t, self.address, self.port) for t in sorted(can) if t in wanted]

    def _prepare_drives(
        self,
        node_obj: dict[str, Any],
        pool: StoragePool,
        devices: list[BlockDevice],
        lvm: Lvm,
        vg: str,
        conditions: list[Condition],
    ) -> set[str]:
        patterns = pool.spec.drives.path_patterns
        min_size = parse_bytes(pool.spec.drives.min_size)
        selection = select_drives(devices, patterns, min_size, vg)
        problem = selection.problem(patterns, min_size)
        if problem:
            reason, message = problem
            conditions.append(Condition("DrivesReady", "False", reason, message))
            self._say(node_obj, reason, message, warning=True)
        if not selection.selected:
            return set()
        paths = [d.path for d in selection.selected]
        try:
            lvm.ensure_volume_group(vg, paths)
            lvm.ensure_thin_pool(vg)
        except LvmError as exc:
            conditions.append(Condition("DrivesReady", "False", "VolumeGroupFailed", str(exc)))
            self._say(node_obj, "VolumeGroupFailed", str(exc), warning=True)
            return set(paths)
        if not problem:
            message = f"volume group {vg} on {', '.join(paths)}"
            conditions.append(Condition("DrivesReady", "True", "DrivesSelected", message))
        return set(paths)

    def _host_keys(self) -> dict[str, str]:
        """Host NQN -> DH-HMAC-CHAP secret, from the Secrets that hold them. The keys never
        reach a log line, an object's status or an Event."""
        keys = {}
        for secret in self.kube.list("v1", "Secret", self.namespace, f"{KEY_LABEL}=true"):
            nqn = (secret["metadata"].get("annotations") or {}).get(HOST_NQN_ANNOTATION)
            data = (secret.get("data") or {}).get("key")
            if nqn and data:
                keys[nqn] = base64.b64decode(data).decode().strip()
        return keys

    def _reconcile_volumes(
        self,
        volumes: list[Volume],
        lvm: Lvm,
        vg: str,
        endpoints: list[Endpoint],
        keys: dict[str, str] | None,
    ) -> None:
        errors: dict[str, str] = {}
        ready_volumes = []
        for volume in volumes:
            mine = [s for s in volume.spec.segments if s.node == self.node]
            if not mine:
                continue
            if volume.metadata.deletion_timestamp is None:
                self._add_finalizer(volume)
            ready_volumes.append(volume)
        exportable = []
        for volume in ready_volumes:
            if volume.metadata.deletion_timestamp is not None:
                exportable.append(volume)  # left out of the target below: exports go
                continue
            failed = False
            for seg in local_segments(self.node, [volume]):
                try:
                    lvm.ensure_volume(vg, seg.lv, parse_bytes(seg.segment.size))
                except LvmError as exc:
                    errors[seg.nqn] = f"logical volume: {exc}"
                    failed = True
            if not failed:
                exportable.append(volume)
        fs = configfs.Fs(self.nvmet_root)
        keyless: frozenset[str] = frozenset()
        if keys is not None:
            # With authentication on, a host without a key is never allowed in.
            keyless = frozenset(h for v in exportable for h in v.spec.hosts if h not in keys)
        desired = desired_target(self.node, exportable, vg, endpoints, keys, keyless)
        try:
            configfs.apply(fs, plan(desired, configfs.observe(fs)))
        except configfs.ConfigfsError as exc:
            log.warning("nvmet: %s", exc)
            for nqn in desired.subsystems:
                errors.setdefault(nqn, f"nvmet: {exc}")
        observed = configfs.observe(fs)
        live = [v for v in ready_volumes if v.metadata.deletion_timestamp is None]
        for name, statuses in segment_statuses(
            self.node, live, observed, endpoints, errors
        ).items():
            body = {
                "apiVersion": API,
                "kind": "Volume",
                "metadata": {"name": name},
                "status": {"segments": [serde.to_dict(s) for s in statuses]},
            }
            self.kube.apply_status(body, self.manager)
        for volume in ready_volumes:
            if volume.metadata.deletion_timestamp is not None:
                self._release(volume, lvm, vg, observed)

    def _add_finalizer(self, volume: Volume) -> None:
        finalizers = volume.metadata.finalizers or []
        if self.finalizer in finalizers:
            return
        data = self.kube.get(API, "Volume", volume.metadata.name)
        if data is None:
            return
        data["metadata"]["finalizers"] = [*finalizers, self.finalizer]
        try:
            self.kube.replace(data)  # resourceVersion guards other agents' finalizers
        except KubeError as exc:
            if exc.status != 409:
                raise
        volume.metadata.finalizers = data["metadata"]["finalizers"]

    def _release(self, volume: Volume, lvm: Lvm, vg: str, observed: Any) -> None:
        """A deleted volume: its exports here are gone (the plan removed them); remove its
        logical volumes, then this agent's finalizer."""
        if self.finalizer not in (volume.metadata.finalizers or []):
            return
        for seg in volume.spec.segments:
            if seg.node != self.node:
                continue
            nqn = naming.subsystem_nqn(volume.metadata.name, seg.index, seg.replica)
            if nqn in observed.subsystems:
                return  # not unexported yet: the next pass goes on
            lvm.remove_volume(vg, naming.segment_lv(volume.metadata.name, seg.index, seg.replica))
        data = self.kube.get(API, "Volume", volume.metadata.name)
        if data is None:
            return
        data["metadata"]["finalizers"] = [
            f for f in data["metadata"].get("finalizers") or [] if f != self.finalizer
        ]
        try:
            self.kube.replace(data)
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise

    def _report_node(
        self,
        node_obj: dict[str, Any],
        devices: list[BlockDevice],
        selected: set[str],
        lvm: Lvm,
        vg_name: str | None,
        endpoints: list[Endpoint],
        ports: list[rdma.Port],
        conditions: list[Condition],
    ) -> None:
        drives = [
            resources.Drive(d.path, format_bytes(d.size), d.model, d.serial, d.path in selected)
            for d in devices
        ]
        group = lvm.volume_group(vg_name) if vg_name else None
        volume_group = None
        if group is not None:
            pool = lvm.logical_volume(group.name, THIN_POOL)
            thin = None
            free = group.free
            if pool is not None:
                thin = resources.ThinPool(
                    THIN_POOL, format_bytes(pool.size), pool.data_percent, pool.metadata_percent
                )
                # Promised thin space counts as used: the pool never silently overcommits.
                free = max(pool.size - lvm.allocated(group.name), 0)
            volume_group = resources.VolumeGroup(
                group.name, format_bytes(group.size), format_bytes(free), thin
            )
        # A refused drive is a warning (DrivesReady); the node serves from what it has.
        ready = volume_group is not None and volume_group.thin_pool is not None
        message = "serving" if ready else "no volume group yet: see DrivesReady"
        if not node_obj.get("spec", {}).get("pool"):
            message = "not in a StoragePool (spec.pool is empty)"
        conditions.append(
            Condition(
                "Ready", "True" if ready else "False", "Heartbeat" if ready else "NotReady", message
            )
        )
        now = _now()
        previous = {c["type"]: c for c in (node_obj.get("status") or {}).get("conditions") or []}
        for c in conditions:
            old = previous.get(c.type)
            same = old and old.get("status") == c.status
            c.last_transition_time = old.get("lastTransitionTime") if same and old else now
            c.observed_generation = node_obj["metadata"].get("generation")
        status = resources.StorageNodeStatus(
            phase="Ready" if ready else "NotReady",
            drives=drives,
            volume_group=volume_group,
            endpoints=endpoints,
            rdma_devices=[p.summary() for p in ports],
            last_heartbeat_time=now,
            conditions=conditions,
            observed_generation=node_obj["metadata"].get("generation"),
        )
        self.kube.patch(
            API, "StorageNode", self.node, {"status": serde.to_dict(status)}, subresource="status"
        )

    def _say(self, obj: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
        """An Event, once per distinct message (not on every pass)."""
        if self._said.get(reason) == message:
            return
        self._said[reason] = message
        try:
            self.kube.event(obj, reason, message, warning=warning, component=self.manager)
        except KubeError as exc:
            log.warning("event not recorded: %s", exc)


def main(node: str, address: str, kubeconfig: str | None, interval: float, once: bool) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    agent = Agent(Kube.from_kubeconfig(kubeconfig), node, address)
    if once:
        agent.reconcile()
        return 0
    try:
        agent.run_forever(interval)
    except KeyboardInterrupt:
        pass
    except CommandError as exc:
        log.error("%s", exc)
        return 1
    return 0
