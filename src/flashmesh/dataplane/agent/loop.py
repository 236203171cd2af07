"""The agent's loop: one pass reads everything it needs (from the watch caches) and makes
the node match. Passes run when a watched change concerns the node, again soon after a
pass that left work undone, and on a slow resync; never on a short timer."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashmesh.core import naming, resources
from flashmesh.core.drives import BlockDevice, select_drives
from flashmesh.core.hosts import duplicate_message, refusal_message, shared_host_nqns
from flashmesh.core.resources import Condition, Endpoint, StorageNode, StoragePool, Volume
from flashmesh.core.units import parse_bytes
from flashmesh.dataplane import identity, process, rdma, udev
from flashmesh.dataplane.agent import fabric_address, metrics
from flashmesh.dataplane.agent.cache import AgentCache
from flashmesh.dataplane.agent.labels import label_own_objects
from flashmesh.dataplane.agent.node_status import NodeReport, report_node
from flashmesh.dataplane.agent.snapshots import reconcile_snapshots
from flashmesh.dataplane.agent.volumes import VolumeReconciler
from flashmesh.dataplane.host_keys import KEY_HINT, keys_from_secrets, malformed
from flashmesh.dataplane.inventory import inventory
from flashmesh.dataplane.lvm import Lvm, LvmError
from flashmesh.dataplane.process import CommandError, Runner
from flashmesh.dataplane.target import configfs, fencing
from flashmesh.kube import Kube, KubeError
from flashmesh.metrics import serve as serve_metrics

log = logging.getLogger(__name__)
API = resources.API_VERSION
NVME_PORT = 4420
LEASE_SECONDS = 40
HEARTBEAT_EVERY = 5.0
# With nothing changing, a pass (and a probe of the drives) this often: it finds what no
# watch tells, such as a drive added or a logical volume removed by hand.
RESYNC_EVERY = 300.0
# Liveness: a pass under way this long, beyond the resync period in which one is due
# anyway, or a heartbeat thread silent for this long, is an agent stuck (a command hung in
# the kernel, a deadlock): /healthz says so and the kubelet restarts it.
STUCK_AFTER = 600.0
# After a pass that left work undone (a failed command, an export not ready), the next
# one comes this soon, doubling up to RETRY_MAX while the work stays undone.
RETRY_FIRST = 2.0
RETRY_MAX = 60.0
MODULES = Path("/sys/module")


@dataclass
class Agent:
    kube: Kube
    node: str
    address: str
    port: int = NVME_PORT
    nvmet_root: Path = configfs.NVMET_ROOT
    # The cut-offs not done yet, kept on a tmpfs (see target/fencing.py).
    cutoffs: Path = fencing.CUTOFFS
    runner: Runner = process.run
    # Where the DH-HMAC-CHAP host keys and the node's Lease live.
    namespace: str = "flashmesh-system"
    identity_source: Path = identity.SMBIOS_UUID
    etc_nvme: Path = identity.ETC_NVME
    resync_every: float = RESYNC_EVERY
    _said: dict[str, str] = field(default_factory=dict)
    _devices: tuple[str, list[BlockDevice]] | None = None
    _cache: AgentCache | None = None
    _probe_drives: bool = True
    # What started the pass under way ("single" for a reconcile() called by itself), and
    # the lvm2 handle whose reports an event pass may keep (see _pass_lvm).
    _trigger: str = "single"
    _lvm: Lvm | None = None
    _beating: bool = False  # a heartbeat thread renews the Lease
    # When the last pass ended and the heartbeat thread last tried (time.monotonic).
    _passed_at: float = field(default_factory=time.monotonic)
    _beat_at: float = field(default_factory=time.monotonic)
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def finalizer(self) -> str:
        return f"{resources.GROUP}/agent-{self.node}"

    @property
    def manager(self) -> str:
        return f"flashmesh-agent-{self.node}"

    # --- the loop ---------------------------------------------------------------------

    @property
    def cache(self) -> AgentCache:
        """The watch caches; a pass without a running agent (--once) lists once instead."""
        if self._cache is None:
            self._cache = AgentCache(self.kube, self.node, self.namespace)
            self._cache.fill()
        return self._cache

    def run_forever(self, heartbeat: Kube | None = None) -> None:
        """Watches, then passes when woken; the Lease is renewed every HEARTBEAT_EVERY
        seconds on its own thread (with its own client), however long a pass takes."""
        if heartbeat is not None:
            self._beating = True
            threading.Thread(
                target=self._heartbeats, args=(heartbeat,), name="heartbeat", daemon=True
            ).start()
        label_own_objects(self.kube, self.node)
        self._cache = AgentCache(self.kube, self.node, self.namespace)
        self._cache.start()
        wake = self._cache.wake
        trigger, delay = "start", RETRY_FIRST
        last_probe = time.monotonic()
        while not self._stopping.is_set():
            wake.clear()  # changes from here on wake the pass after this one
            self._trigger = trigger
            self._probe_drives = trigger in ("start", "resync")
            if self._probe_drives:
                last_probe = time.monotonic()
            metrics.PASSES.labels(trigger).inc()
            begin = time.monotonic()
            outcome, settled = "error", False
            try:
                settled = self.reconcile()
                outcome = "ok"
            except Exception:  # keep serving; the next pass starts from what is there
                log.exception("reconcile pass failed")
                self._lvm = None
            metrics.PASS_SECONDS.labels(outcome).observe(time.monotonic() - begin)
            self._passed_at = time.monotonic()
            if settled:
                delay = RETRY_FIRST
                timeout = max(self.resync_every - (time.monotonic() - last_probe), 0)
            else:
                timeout, delay = delay, min(delay * 2, RETRY_MAX)
            if self._stopping.is_set():
                break
            woken = wake.wait(timeout)
            trigger = "event" if woken else ("resync" if settled else "retry")
        log.info("stopped after finishing its pass")

    def stop(self) -> None:
        """Ends run_forever once the pass under way (if any) is finished: a pass stopped
        between two of its steps could leave a host unlinked but still connected, or a
        volume half made. Safe to call from a signal handler."""
        self._stopping.set()
        cache = self._cache
        if cache is not None:
            # Not set() here: a signal handler runs on the main thread, which may hold the
            # Event's (non-reentrant) lock at that moment, inside wait() or clear().
            threading.Thread(target=cache.wake.set, name="stop", daemon=True).start()

    def stop_on_sigterm(self) -> None:
        """SIGTERM (a pod deleted, a DaemonSet rolled out) stops the agent between passes."""

        def handler(signum: int, frame: object) -> None:
            log.info("SIGTERM: finishing the pass under way, then stopping")
            self.stop()

        signal.signal(signal.SIGTERM, handler)

    def reconcile(self) -> bool:
        """One pass; True when it left nothing undone."""
        cache = self.cache
        node_obj = self._storage_node()
        if not self._beating:
            self._heartbeat()  # a single pass (no heartbeat thread) renews the Lease itself
        node = StorageNode.from_dict(node_obj)
        pool = self._pool(node.spec.pool)
        devices = self._inventory(pool)
        ports = rdma.discover()
        conditions: list[Condition] = []
        endpoints = self._endpoints(ports, pool, self._fabric_address(node_obj, conditions))
        # nvmet and a target driver per transport served (no-ops once loaded).
        modules = ["nvmet", *(f"nvmet-{e.transport}" for e in endpoints)]
        if any(not (MODULES / m.replace("-", "_")).exists() for m in modules):
            process.check(self.runner, ["modprobe", "-a", *modules])
        own_nqn, refused = self._host_identity(node_obj, conditions)
        lvm = self._pass_lvm()
        vg_name = naming.pool_volume_group(pool.metadata.name) if pool else None
        selected: set[str] = set()
        settled = True
        if pool and vg_name:
            selected = self._prepare_drives(node_obj, pool, devices, lvm, vg_name, conditions)
        if vg_name and lvm.volume_group(vg_name) is not None:
            volume_objs = cache.volumes.items()
            volumes = [Volume.from_dict(v) for v in volume_objs]
            keys = None
            if pool and pool.spec.security.dhchap:
                # With authentication on, a host without a key is never allowed in.
                keys = keys_from_secrets(cache.secrets.items())
                # A key nvmet would refuse fails that host alone, never the node's plan.
                for host, why in malformed(keys).items():
                    refused.setdefault(host, why)
                    del keys[host]
                for host in {h for v in volumes for h in v.spec.hosts} - set(keys):
                    refused.setdefault(host, f"no DH-HMAC-CHAP key for {host}: {KEY_HINT}")
            snapshots, snaps_done = reconcile_snapshots(
                self.kube, lvm, self.node, vg_name, self.finalizer, self.manager,
                cache.snapshots.items(), cache.wrote, self._snapshot,
            )  # fmt: skip
            done = VolumeReconciler(
                self.kube, self.node, self.finalizer, self.manager, self.nvmet_root,
                lvm, vg_name, endpoints, keys, refused, fencing.Cutoffs(self.cutoffs),
                cache.wrote,
            ).run(volume_objs, volumes, snapshots)  # fmt: skip
            settled = done and snaps_done
        report = NodeReport(
            devices, selected, vg_name, endpoints, ports, conditions, host_nqn=own_nqn
        )
        cache.wrote(report_node(self.kube, node_obj, lvm, report))
        # A volume group that failed to form may form on a retry; refused drives wait for
        # a change of the pool or of the drives (an event, or the resync's probe).
        return settled and not any(c.reason == "VolumeGroupFailed" for c in conditions)

    # --- pieces -----------------------------------------------------------------------

    def _pass_lvm(self) -> Lvm:
        """The pass's lvm2 handle. An event pass keeps the reports of the pass before it:
        the agent is its volume group's only writer and each of its own changes drops them,
        so a publish or an unpublish runs no lvm2 command at all (each costs a second of an
        emulated CPU, a good part of a real one). Start, resync and retry passes, and a pass
        after a failed one, read afresh; so the thin pool's data use in the node's status is
        as fresh as the last of those or of the agent's own changes."""
        if self._trigger != "event" or self._lvm is None:
            self._lvm = Lvm(self.runner)
        return self._lvm

    def _storage_node(self) -> dict[str, Any]:
        found = self.cache.storage_node()
        if found is None:
            found = self.kube.get(API, "StorageNode", self.node)  # the cache may lag a create
        if found is None:
            log.info("registering StorageNode %s", self.node)
            found = self.kube.create(
                {"apiVersion": API, "kind": "StorageNode", "metadata": {"name": self.node}}
            )
        return found

    def _snapshot(self, name: str) -> dict[str, Any] | None:
        """A Snapshot with no segment here (a restore's source), read when asked for."""
        return self.kube.get(API, "Snapshot", name)

    def health(self, now: float | None = None) -> str | None:
        """Why the agent is stuck (None: it is live): no pass ended for the resync period
        plus STUCK_AFTER (a failing pass still ends: restarting would not help it), or the
        heartbeat thread has not tried to renew the Lease for STUCK_AFTER."""
        now = time.monotonic() if now is None else now
        since_pass = now - self._passed_at
        if since_pass > self.resync_every + STUCK_AFTER:
            return f"no reconcile pass has ended for {since_pass:.0f} s"
        if self._beating and now - self._beat_at > STUCK_AFTER:
            return f"the Lease heartbeat has not run for {now - self._beat_at:.0f} s"
        return None

    def _heartbeats(self, kube: Kube) -> None:
        while True:
            self._heartbeat(kube)
            self._beat_at = time.monotonic()
            time.sleep(HEARTBEAT_EVERY)

    def _heartbeat(self, kube: Kube | None = None) -> None:
        try:
            (kube or self.kube).renew_lease(
                self.namespace, naming.node_lease(self.node), self.node, LEASE_SECONDS
            )
        except KubeError as exc:  # the node still serves; its heartbeat goes stale
            log.warning("lease %s/%s not renewed: %s", self.namespace, self.node, exc)

    def _inventory(self, pool: StoragePool | None) -> list[BlockDevice]:
        """The node's drives, probed again on a start or a resync once the pool's volume
        group is made (drives come and go rarely; each probe runs a command per drive),
        and on every pass until then."""
        name = pool.metadata.name if pool else ""
        if self._devices is not None and not self._probe_drives:
            for_pool, devices = self._devices
            made = any(d.volume_group == naming.pool_volume_group(name) for d in devices)
            if for_pool == name and made:
                return devices
        devices = inventory(self.runner)
        self._devices = (name, devices)
        return devices

    def _pool(self, name: str | None) -> StoragePool | None:
        data = self.cache.pool(name)
        return StoragePool.from_dict(data) if data else None

    def _endpoints(
        self, ports: list[rdma.Port], pool: StoragePool | None, address: str
    ) -> list[Endpoint]:
        """tcp always; rdma when an active RDMA port carries the node's fabric address."""
        can = ["tcp"]
        if rdma.port_for_address(ports, address) is not None:
            can.append("rdma")
        wanted = pool.spec.transports if pool else can
        return [Endpoint(t, address, self.port) for t in sorted(can) if t in wanted]

    def _fabric_address(self, node_obj: dict[str, Any], conditions: list[Condition]) -> str:
        """spec.fabricAddress, else --address; a change waits for no volume published."""
        wanted = (node_obj.get("spec") or {}).get("fabricAddress")
        shown = (node_obj.get("status") or {}).get("endpoints") or []
        serving = shown[0].get("address") if shown else None
        published = sum(1 for v in self.cache.volumes.items() if (v.get("spec") or {}).get("hosts"))
        address, condition = fabric_address.choose(wanted, self.address, serving, published)
        conditions.append(condition)
        return address

    def _host_identity(
        self, node_obj: dict[str, Any], conditions: list[Condition]
    ) -> tuple[str | None, dict[str, str]]:
        """This node's host NQN, and the host NQNs that no export may allow (each with why):
        those claimed by two nodes, among StorageNodes and the CSI driver's CSINode
        entries."""
        try:
            own = identity.host_nqn(self.identity_source, self.etc_nvme)
        except identity.IdentityError as exc:
            conditions.append(Condition("HostNQNUnique", "Unknown", "NoIdentity", str(exc)))
            own = None
        claims = [(self.node, own)] if own else []
        for other in self.cache.storage_nodes.items():
            name = other["metadata"]["name"]
            nqn = (other.get("status") or {}).get("hostNQN")
            if name != self.node and nqn:
                claims.append((name, nqn))
        for csinode in self.cache.csinodes.items():
            for driver in (csinode.get("spec") or {}).get("drivers") or []:
                if driver.get("name") == resources.CSI_DRIVER and driver.get("nodeID"):
                    claims.append((csinode["metadata"]["name"], driver["nodeID"]))
        shared = shared_host_nqns(claims)
        refused = {nqn: refusal_message(nqn, nodes) for nqn, nodes in shared.items()}
        if own in shared:
            message = duplicate_message(own, self.node, shared[own])
            conditions.append(Condition("HostNQNUnique", "False", "DuplicateHostNQN", message))
            self._say(node_obj, "DuplicateHostNQN", message, warning=True)
        elif own:
            message = f"host NQN {own} is claimed by this node only"
            conditions.append(Condition("HostNQNUnique", "True", "Unique", message))
        return own, refused

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
            members = {d.path for d in devices if d.volume_group == vg}
            lvm.ensure_volume_group(vg, paths, members)
            lvm.ensure_thin_pool(vg)
        except LvmError as exc:
            conditions.append(Condition("DrivesReady", "False", "VolumeGroupFailed", str(exc)))
            self._say(node_obj, "VolumeGroupFailed", str(exc), warning=True)
            return set(paths)
        if not problem:
            message = f"volume group {vg} on {', '.join(paths)}"
            conditions.append(Condition("DrivesReady", "True", "DrivesSelected", message))
        return set(paths)

    def _say(self, obj: dict[str, Any], reason: str, message: str, warning: bool = False) -> None:
        """An Event, once per distinct message (not on every pass)."""
        if self._said.get(reason) == message:
            return
        self._said[reason] = message
        try:
            self.kube.event(obj, reason, message, warning=warning, component=self.manager)
        except KubeError as exc:
            log.warning("event not recorded: %s", exc)


def main(
    node: str,
    address: str,
    kubeconfig: str | None,
    resync: float,
    once: bool,
    namespace: str = "flashmesh-system",
    metrics_port: int | None = None,
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    agent_name = f"flashmesh-agent/{node}"
    kube = Kube.from_kubeconfig(kubeconfig, user_agent=agent_name)
    agent = Agent(kube, node, address, namespace=namespace, resync_every=resync)
    if not once:
        serve_metrics(metrics_port, health=agent.health)
    agent.stop_on_sigterm()
    udev.install_rules()  # before any logical volume of a tenant appears on this host
    if once:
        agent.reconcile()
        return 0
    try:
        agent.run_forever(heartbeat=Kube.from_kubeconfig(kubeconfig, user_agent=agent_name))
    except KeyboardInterrupt:
        pass
    except CommandError as exc:
        log.error("%s", exc)
        return 1
    return 0
