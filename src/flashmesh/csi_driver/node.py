"""The CSI Node service: connect a volume's segments over NVMe-oF, assemble a stripe,
make and mount a filesystem (or hand over the raw block device), and undo it all.

NodeStage records what it connected in a small file per volume under state_dir, so that
NodeUnstage and NodeExpandVolume, which get only the volume id and a path, disconnect or
grow exactly that volume's subsystems, even after the plugin restarts."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from flashmesh.core import mirrors, naming, params
from flashmesh.core.resources import TOPOLOGY_KEY
from flashmesh.csi_driver import capabilities, fabric_paths
from flashmesh.csi_driver._proto import csi_pb2, csi_pb2_grpc
from flashmesh.csi_driver.errors import CsiError, invalid, not_found, require
from flashmesh.csi_driver.locks import VolumeLocks
from flashmesh.dataplane import assembly, filesystem, identity, mirror, process, rdma
from flashmesh.dataplane.initiator import nvme, sysfs
from flashmesh.dataplane.process import CommandError, SecretRunner

log = logging.getLogger(__name__)
RPC = csi_pb2.NodeServiceCapability.RPC
CHUNK_SECTORS = 256  # 128 KiB stripe chunks
DHCHAP_CONTEXT = "dhchap"
STAGE_SECRET_KEY = "dhchapKey"


def _fail(code: grpc.StatusCode, message: str) -> CsiError:
    return CsiError(code, message)


def _connected_segments(vid: str) -> list[str]:
    """The NQNs of this volume's segments the host has a subsystem of."""
    prefix = naming.subsystem_nqn(vid, 0, 0).rsplit(".", 1)[0] + "."
    return [s.nqn for s in sysfs.subsystems() if s.nqn.startswith(prefix)]


def _described(block: bool, fstype: str | None) -> str:
    return "a raw block device" if block else f"a {fstype} filesystem"


def _events(members: list[str]) -> int | None:
    """The lowest md event count among these members' superblocks (md writes them all at
    once; the lowest is the one every in-sync member is known to have reached)."""
    counts = []
    for name in members:
        try:
            found = mirror.events(f"/dev/{name}")
        except (mirror.MirrorError, OSError):
            continue
        if found is not None:
            counts.append(found)
    return min(counts) if counts else None


def parse_segments(raw: str) -> list[dict[str, Any]]:
    """publish_context["segments"] as ControllerPublish wrote it: a list of {nqn,
    endpoints: ["transport:address:port", ...]}; ValueError names what is wrong."""
    segments = json.loads(raw)
    if not isinstance(segments, list) or not segments:
        raise ValueError("segments must be a non-empty list")
    for seg in segments:
        if not isinstance(seg, dict) or not isinstance(seg.get("nqn"), str) or not seg["nqn"]:
            raise ValueError(f"segment {seg!r} has no subsystem NQN")
        endpoints = seg.get("endpoints")
        if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
            raise ValueError(f"segment {seg['nqn']} has no endpoint list")
        for endpoint in endpoints:
            transport, _, rest = endpoint.partition(":")
            address, _, port = rest.rpartition(":")
            if transport not in ("tcp", "rdma") or not address or not port.isdigit():
                raise ValueError(f"endpoint {endpoint!r} is not transport:address:port")
    return segments


@dataclass
class Staged:
    """What NodeStage did for one volume. A mirrored one also keeps its md arrays (one per
    stripe index), which replica each subsystem is, and how to connect them again."""

    nqns: list[str]
    device: str
    dm: str | None
    block: bool
    fstype: str | None
    md: list[str] = field(default_factory=list)
    members: dict[str, list[int]] = field(default_factory=dict)  # nqn -> [index, replica]
    segments: list[dict[str, Any]] = field(default_factory=list)  # as publish_context has them
    context: dict[str, str] = field(default_factory=dict)  # volume_context


@dataclass
class Node(csi_pb2_grpc.NodeServicer):
    host_nqn: str
    host_id: str
    fabric: str
    state_dir: Path
    runner: SecretRunner = process.run
    max_volumes: int = 128
    # The host's own NVMe identity files (see dataplane/identity.py) and its DH-HMAC-CHAP
    # key, `hostkey`, where libnvme and nvme-stas read it.
    etc_nvme: Path = identity.ETC_NVME
    locks: VolumeLocks = field(default_factory=VolumeLocks)
    device_number: Callable[[str], str] = assembly.device_number  # major:minor of a node
    # Reads and writes mirrored Volumes' replica records (None: no API access, so no
    # mirrored volume can be staged here).
    replica_status: Any = None

    @classmethod
    def from_host(cls, fabric: str, kubeconfig: str | None) -> Node:
        state = Path(os.environ.get("FLASHMESH_NODE_STATE", "/var/lib/flashmesh/node"))
        staged = state.is_dir() and any(state.glob("fm-*.json"))
        # Not a .json: the folder's *.json are the staged volumes.
        ident = identity.kept_identity(state / "host-identity", upgraded=staged)
        log.info("host NQN %s, host ID %s, from %s", ident.nqn, ident.hostid, ident.source)
        replicas = None
        host = ident.nqn
        if kubeconfig is not None or os.environ.get("KUBERNETES_SERVICE_HOST"):
            from flashmesh.csi_driver.replica_status import ReplicaStatus

            replicas = ReplicaStatus(kubeconfig, host)
        return cls(host, ident.hostid, fabric, state, replica_status=replicas)

    # --- information ----------------------------------------------------------------------

    def NodeGetInfo(self, request: Any, context: Any) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.host_nqn,
            max_volumes_per_node=self.max_volumes,
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: self.fabric}),
        )

    def NodeGetCapabilities(
        self, request: Any, context: Any
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        kinds = [
            RPC.STAGE_UNSTAGE_VOLUME,
            RPC.GET_VOLUME_STATS,
            RPC.EXPAND_VOLUME,
            RPC.VOLUME_CONDITION,
            RPC.SINGLE_NODE_MULTI_WRITER,
        ]
        caps = [csi_pb2.NodeServiceCapability(rpc=RPC(type=k)) for k in kinds]
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=caps)

    # --- staging --------------------------------------------------------------------------

    def NodeStageVolume(self, request: Any, context: Any) -> csi_pb2.NodeStageVolumeResponse:
        vid, staging = request.volume_id, request.staging_target_path
        require(request, "volume_id", "staging_target_path", "volume_capability")
        capabilities.check([request.volume_capability], "volume_capability")
        raw = request.publish_context.get("segments")
        if not raw:
            raise _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"publish_context has no segments for {vid}: was it published to this "
                "node (ControllerPublishVolume)?",
            )
        try:
            segments = parse_segments(raw)
            chosen = params.from_context(dict(request.volume_context))
        except (ValueError, params.ParameterError) as exc:
            raise invalid(
                f"publish_context or volume_context of {vid} is malformed: {exc}"
            ) from None
        cap = request.volume_capability
        why = capabilities.mirror_problem(cap, chosen.layout.replicas)
        if why:
            raise invalid(f"volume_capability: {why}")
        with self.locks.hold(vid):
            wanted = request.volume_context.get(DHCHAP_CONTEXT) == "true"
            secret = self.secret(wanted, dict(request.secrets))
            block = cap.WhichOneof("access_type") == "block"
            fstype = None if block else capabilities.fs_type(cap)
            before = self.load(vid)
            if before is not None and (before.block, before.fstype) != (block, fstype):
                was = _described(before.block, before.fstype)
                raise _fail(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"volume {vid} is staged on this node as {was}, not "
                    f"{_described(block, fstype)}: NodeUnstageVolume it first",
                )
            if chosen.layout.replicas > 1:
                staged = self._stage_mirrored(vid, segments, chosen, secret)
                staged.block, staged.fstype = block, fstype
                staged.context = dict(request.volume_context)
                device = staged.device
            else:
                device, dm = self._connect_all(vid, segments, chosen, secret, before is None)
                staged = Staged([s["nqn"] for s in segments], device, dm, block, fstype)
                # For the monitor: how to connect a segment again if the kernel gives its
                # controller up (ctrlLossTmo), and restripe.
                staged.segments, staged.context = segments, dict(request.volume_context)
            self._save(vid, staged)
            read_only = cap.access_mode.mode in capabilities.READ_ONLY or (
                request.publish_context.get(capabilities.READONLY_CONTEXT) == "true"
            )
            if read_only:
                # A read-only bind mount of a device node does not stop writes to the
                # device (and a container runtime makes its own node from major:minor):
                # the block device itself is made read-only.
                self._set_read_only(vid, device)
            if not block:
                assert fstype is not None
                no_format = request.publish_context.get(capabilities.NO_FORMAT_CONTEXT) == "true"
                flags = list(cap.mount.mount_flags)
                self._mount_staged(vid, device, staging, fstype, flags, read_only, no_format)
        return csi_pb2.NodeStageVolumeResponse()

    def _set_read_only(self, vid: str, device: str) -> None:
        try:
            process.check(self.runner, ["blockdev", "--setro", device])
        except CommandError as exc:
            raise _fail(grpc.StatusCode.INTERNAL, f"making {vid} read-only: {exc}") from None

    def _stage_mirrored(
        self, vid: str, segments: list[dict[str, Any]], chosen: params.VolumeParams,
        secret: str | None,
    ) -> Staged:  # fmt: skip
        """One md RAID1 per stripe index over its replicas, striped when the width is above
        1; never from replicas the Volume's status says are behind (see core.mirrors)."""
        if self.replica_status is None:
            raise _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {vid} is mirrored and this node plugin has no Kubernetes API access"
                " to read which replicas are in sync: run it with a kubeconfig or in a pod",
            )
        layout = chosen.layout
        by_key = {(int(s.get("index", 0)), int(s.get("replica", 0))): s for s in segments}
        nodes = {k: str(s.get("node", "?")) for k, s in by_key.items()}
        devices: dict[mirrors.Key, str] = {}
        for key, seg in sorted(by_key.items()):
            try:
                devices[key] = self.connect(vid, seg["nqn"], seg["endpoints"], chosen, secret)
            except CsiError as exc:
                log.warning("volume %s: replica %s unreachable: %s", vid, key, exc)
        records, volume = self.replica_status.read(vid)
        try:
            on_disk = {k: n for k, d in devices.items() if (n := mirror.events(d)) is not None}
            plan = mirrors.plan_stage(
                layout.stripe_width, layout.replicas, records, set(devices), nodes, on_disk
            )
        except (mirrors.StageRefused, mirror.MirrorError) as exc:
            for key in devices:
                nvme.disconnect(self.runner, by_key[key]["nqn"])
            raise _fail(grpc.StatusCode.UNAVAILABLE, f"volume {vid}: {exc}") from None
        first = self.load(vid) is None  # not a repeat of a stage that succeeded
        made: list[str] = []
        try:
            arrays = [
                self._mirror_index(vid, index, devices, plan, layout.replicas, made)
                for index in range(layout.stripe_width)
            ]
            device, dm = self._assemble(vid, arrays)
        except (mirror.MirrorError, CsiError) as exc:
            if first:  # what this call made goes, so a failed stage leaks nothing
                for name in made:
                    mirror.stop(self.runner, name)
                for key in devices:
                    nvme.disconnect(self.runner, by_key[key]["nqn"])
            if isinstance(exc, CsiError):
                raise
            raise _fail(grpc.StatusCode.INTERNAL, f"assembling {vid}: {exc}") from None
        staged = Staged(
            [s["nqn"] for _, s in sorted(by_key.items())], device, dm, False, None,
            md=[mirrors.md_name(vid, i) for i in range(layout.stripe_width)],
            members={s["nqn"]: [k[0], k[1]] for k, s in by_key.items()},
            segments=segments,
        )  # fmt: skip
        self.record_replicas(vid, staged, volume)
        return staged

    def _mirror_index(
        self, vid: str, index: int, devices: dict[mirrors.Key, str], plan: mirrors.StagePlan,
        replicas: int, made: list[str],
    ) -> str:  # fmt: skip
        """The RAID1 of one stripe index, assembled (or created over fresh replicas) from
        the plan's members; replicas behind are re-added unless md already holds them."""
        name = mirrors.md_name(vid, index)
        members = [devices[(index, r)] for r in plan.assemble[index]]
        ours = {sysfs.block_name(d) for d in devices.values()}
        state = mirror.array_state(name)
        if state is not None and state.members and not set(state.members) & ours:
            mirror.forget(name)  # a stale link to another volume's array
            state = None
        if state is None:
            mirror.forget(name)  # a link left to an array that is gone
            if not any(mirror.has_superblock(self.runner, d) for d in members):
                if index not in plan.creatable:
                    raise _fail(
                        grpc.StatusCode.UNAVAILABLE,
                        f"volume {vid}: segment {index}'s mirror was made before (its "
                        "replicas are recorded in the Volume's status), but no replica "
                        f"reachable now ({', '.join(str(r) for r in plan.assemble[index])}) "
                        "holds its md superblock: it is not made again over them, which "
                        "would start an empty array; bring back the storage node of a "
                        "replica that holds the data",
                    )
                absent = ["missing"] * (replicas - len(members))
                mirror.create(self.runner, name, [*members, *absent])
            else:
                mirror.assemble(self.runner, name, members)
            made.append(name)
            state = mirror.array_state(name)
        held = set(state.members) if state else set()
        for replica in plan.re_add[index]:
            device = devices[(index, replica)]
            if sysfs.block_name(device) in held:
                continue  # a repeat while it resyncs: md has it already
            try:
                mirror.re_add(self.runner, name, device)
            except mirror.MirrorError as exc:  # the monitor tries again
                log.warning("volume %s: replica %s not re-added yet: %s", vid, replica, exc)
        return mirror.md_path(name)

    def record_replicas(self, vid: str, staged: Staged, volume: dict[str, Any]) -> None:
        """The Volume's replica records as md sees them now (written only on a change)."""
        if self.replica_status is None or not volume:
            return
        if self.host_nqn not in ((volume.get("spec") or {}).get("hosts") or []):
            return  # detached from this node: the node holding it now keeps the records
        before = mirrors.records_from_status((volume.get("status") or {}).get("replicas"))
        replicas = max((k[1] for k in staged.members.values()), default=0) + 1
        now: dict[mirrors.Key, mirrors.ReplicaRecord] = {}
        for index, name in enumerate(staged.md):
            state = mirror.array_state(name)
            if state is None:  # not seen now: its records stay as they were
                now |= {k: r for k, r in before.items() if k[0] == index}
                continue
            device_replica = {
                Path(sysfs.namespace_device(nqn) or "").name: key[1]
                for nqn, key in staged.members.items()
                if key[0] == index
            }
            members = {
                device_replica[d]: s for d, s in state.members.items() if d in device_replica
            }
            now |= mirrors.record(
                index, mirrors.index_states(members, replicas), before,
                mirrors.sync_percent(state.sync_completed),
                _events([d for d, s in state.members.items() if s == mirrors.IN_SYNC]),
            )  # fmt: skip
        if now and now != before:
            self.replica_status.write(vid, now, volume)

    def secret(self, wanted: bool, given: dict[str, str]) -> str | None:
        """This host's DH-HMAC-CHAP key: from the node-stage secret a StorageClass names
        (key `dhchapKey`), else from the host's own /etc/nvme/hostkey. The node plugin reads
        no Secret: pods of one DaemonSet share one service account, so RBAC could not keep
        one node from another's key; a file on the node can. Read at every stage, so a
        rotated key is used from the next connect on."""
        if not wanted:
            return None
        if given.get(STAGE_SECRET_KEY):
            return given[STAGE_SECRET_KEY]
        from flashmesh.dataplane.host_keys import key_problem

        path = self.etc_nvme / "hostkey"
        try:
            key = path.read_text().strip()
        except FileNotFoundError:
            key = ""
        except OSError as exc:
            raise _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the pool asks for DH-HMAC-CHAP and this host's key {path} cannot be read "
                f"({exc.strerror})",
            ) from None
        if not key:
            raise _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the pool asks for DH-HMAC-CHAP and host {self.host_nqn} has no key: write "
                f"it to {path} on the node (`nvme gen-dhchap-key -n {self.host_nqn}`, mode "
                "0600) and give the storage agents the same key in its Secret",
            )
        why = key_problem(key)
        if why:
            raise _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this host's DH-HMAC-CHAP key {path} is malformed: {why}",
            )
        return key

    def connect(
        self, vid: str, nqn: str, endpoints: list[str], chosen: params.VolumeParams,
        secret: str | None,
    ) -> str:  # fmt: skip
        wants_rdma = chosen.transport is None and any(e.startswith("rdma:") for e in endpoints)
        interfaces = fabric_paths.rdma_interfaces(rdma.discover()) if wants_rdma else set()
        first, fallback = fabric_paths.plan(
            endpoints, chosen.transport, interfaces, fabric_paths.kernel_route
        )
        if not first:
            raise _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{nqn} is not served over {chosen.transport or 'tcp'} (endpoints: "
                f"{', '.join(endpoints) or 'none'})",
            )
        try:
            return self._connect_paths(nqn, first, chosen, secret)
        except CsiError as exc:
            if not fallback:
                raise
            message = (
                f"segment {nqn}: the connect over {first[0].transport} failed "
                f"({exc.message}); connected over tcp instead"
            )
        device = self._connect_paths(nqn, fallback, chosen, secret)
        log.warning("volume %s: %s", vid, message)
        if self.replica_status is not None:
            self.replica_status.event(vid, "TransportFallback", message)
        return device

    def _connect_paths(
        self, nqn: str, paths: list[fabric_paths.FabricPath], chosen: params.VolumeParams,
        secret: str | None,
    ) -> str:  # fmt: skip
        t = chosen.timeouts
        device = ""
        for path in paths:
            opts = nvme.ConnectOptions(  # the endpoint's shape was checked by parse_segments
                path.transport,
                path.address,
                path.port,
                nqn,
                self.host_nqn,
                identity.host_id_now(self.host_nqn, self.host_id, self.etc_nvme),
                ctrl_loss_tmo=t.ctrl_loss_tmo,
                reconnect_delay=t.reconnect_delay,
                fast_io_fail_tmo=t.fast_io_fail_tmo,
                keep_alive_tmo=t.keep_alive_tmo,
                nr_io_queues=chosen.nr_io_queues,
                dhchap_secret=secret,
            )
            try:
                device = nvme.connect(self.runner, opts)
            except (nvme.InitiatorError, CommandError) as exc:
                raise _fail(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        return device

    def _connect_all(
        self, vid: str, segments: list[dict[str, Any]], chosen: params.VolumeParams,
        secret: str | None, first: bool,
    ) -> tuple[str, str | None]:  # fmt: skip
        """Every segment connected and striped; a first stage that fails half-way leaves
        nothing connected (no state is saved for NodeUnstage to undo it from)."""
        tried: list[str] = []
        try:
            devices = []
            for seg in segments:
                tried.append(seg["nqn"])
                devices.append(self.connect(vid, seg["nqn"], seg["endpoints"], chosen, secret))
            return self._assemble(vid, devices)
        except Exception:
            if first:
                for nqn in tried:
                    try:
                        nvme.disconnect(self.runner, nqn)
                    except nvme.InitiatorError as exc:
                        log.warning("volume %s: %s", vid, exc)
            raise

    def restripe(self, vid: str, devices: list[str]) -> None:
        """The stripe's table loaded again over these devices (its segments, in order)."""
        self._assemble(vid, devices, reload=True)

    def _assemble(
        self, vid: str, devices: list[str], reload: bool = False
    ) -> tuple[str, str | None]:
        """The stripe over the devices; `reload` loads its table again even where it looks
        unchanged (a segment connected again may have its old device number)."""
        if len(devices) == 1:
            return devices[0], None
        # /dev/md/<name> links name no block device in sysfs: size what they point to.
        sizes = [sysfs.block_sectors(sysfs.block_name(d)) or 0 for d in devices]
        name = assembly.dm_name(vid)
        try:
            return assembly.ensure_striped(
                self.runner, name, devices, min(sizes), CHUNK_SECTORS,
                number_of=self.device_number, reload=reload,
            ), name  # fmt: skip
        except assembly.AssemblyError as exc:
            raise _fail(grpc.StatusCode.INTERNAL, f"assembling {vid}: {exc}") from None

    def _mount_staged(
        self,
        vid: str,
        device: str,
        staging: str,
        fstype: str,
        flags: list[str],
        read_only: bool,
        no_format: bool,
    ) -> None:
        try:
            found = filesystem.probe(self.runner, device)
            if found is None:
                if no_format:
                    # blkid knows no signature on it, but it was written as a raw device:
                    # its data may be anything, and mkfs would destroy it.
                    raise _fail(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"volume {vid} was published as a raw block device before, and "
                        "blkid finds no filesystem on it: making one would destroy what "
                        "was written to it; stage it as a block volume (or, if its data "
                        "is not wanted, delete it and provision a new volume)",
                    )
                if read_only:
                    raise _fail(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"volume {vid} holds no filesystem, and a read-only volume "
                        "cannot be given one: write it from a single writer first",
                    )
                filesystem.make(self.runner, device, fstype)
                found = fstype
            options = list(flags)
            if read_only:
                if filesystem.needs_recovery(self.runner, device, found):
                    raise _fail(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"volume {vid}'s {found} journal needs recovery: the writer did "
                        "not unmount it cleanly; mount it read-write once, then "
                        "publish it read-only",
                    )
                options += list(filesystem.readonly_options(found))
            filesystem.mount(self.runner, device, staging, found, options)
            if not read_only:
                # A restore into a bigger volume: Kubernetes never calls NodeExpand for it.
                filesystem.grow(self.runner, device, staging, found)
        except filesystem.NotBlank as exc:
            raise _fail(grpc.StatusCode.FAILED_PRECONDITION, f"volume {vid}: {exc}") from None
        except filesystem.FilesystemError as exc:
            raise _fail(grpc.StatusCode.INTERNAL, f"volume {vid}: {exc}") from None

    def NodeUnstageVolume(self, request: Any, context: Any) -> csi_pb2.NodeUnstageVolumeResponse:
        vid, staging = request.volume_id, request.staging_target_path
        require(request, "volume_id", "staging_target_path")
        with self.locks.hold(vid):
            try:
                filesystem.unmount(self.runner, staging)
                staged = self.load(vid)
                if staged is not None:
                    if staged.dm:
                        assembly.remove(self.runner, staged.dm)
                    for name in staged.md:
                        mirror.stop(self.runner, name)
                    for nqn in staged.nqns:
                        nvme.disconnect(self.runner, nqn)
                    self._state(vid).unlink(missing_ok=True)
                else:
                    # A stage that died before it saved its record (the plugin killed): its
                    # segments' NQNs follow from the volume id, so nothing stays connected.
                    for nqn in _connected_segments(vid):
                        nvme.disconnect(self.runner, nqn)
            except (
                filesystem.FilesystemError, assembly.AssemblyError, nvme.InitiatorError,
                mirror.MirrorError,
            ) as exc:  # fmt: skip
                raise _fail(grpc.StatusCode.INTERNAL, f"unstaging {vid}: {exc}") from None
        return csi_pb2.NodeUnstageVolumeResponse()

    # --- publishing -------------------------------------------------------------------------

    def NodePublishVolume(self, request: Any, context: Any) -> csi_pb2.NodePublishVolumeResponse:
        vid, target, staging = request.volume_id, request.target_path, request.staging_target_path
        require(request, "volume_id", "target_path", "volume_capability")
        capabilities.check([request.volume_capability], "volume_capability")
        if not staging:  # the spec's own row for it: FAILED_PRECONDITION, not a bad argument
            raise _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"staging_target_path is not set for {vid}: this driver stages volumes "
                "(STAGE_UNSTAGE_VOLUME); call NodeStageVolume and publish from its path",
            )
        with self.locks.hold(vid):
            staged = self.load(vid)
            if staged is None:
                raise _fail(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"volume {vid} is not staged on this node: NodeStageVolume first",
                )
            read_only = request.readonly or (
                request.volume_capability.access_mode.mode in capabilities.READ_ONLY
            )
            source = staged.device if staged.block else staging
            self._bind(source, target, staged.block, read_only)
        return csi_pb2.NodePublishVolumeResponse()

    def _bind(self, source: str, target: str, block: bool, read_only: bool) -> None:
        if filesystem.mounted_at(target) is not None:
            return
        path = Path(target)
        if block:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()  # a CO that made a directory: a device binds onto a file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
        else:
            path.mkdir(parents=True, exist_ok=True)
        try:
            process.check(self.runner, ["mount", "--bind", source, target])
            if read_only:
                process.check(self.runner, ["mount", "-o", "remount,bind,ro", target])
        except CommandError as exc:
            raise _fail(grpc.StatusCode.INTERNAL, f"publishing at {target}: {exc}") from None

    def NodeUnpublishVolume(
        self, request: Any, context: Any
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        vid, target = request.volume_id, request.target_path
        require(request, "volume_id", "target_path")
        with self.locks.hold(vid):
            try:
                filesystem.unmount(self.runner, target)
            except filesystem.FilesystemError as exc:
                raise _fail(grpc.StatusCode.INTERNAL, str(exc)) from None
            path = Path(target)
            if path.is_dir():
                path.rmdir()
            elif path.exists():
                path.unlink()
        return csi_pb2.NodeUnpublishVolumeResponse()

    # --- stats and growth ----------------------------------------------------------------------

    def NodeGetVolumeStats(self, request: Any, context: Any) -> csi_pb2.NodeGetVolumeStatsResponse:
        vid, path = request.volume_id, request.volume_path
        require(request, "volume_id", "volume_path")
        if not Path(path).exists():
            raise not_found(f"volume_path {path} does not exist")
        staged = self.load(vid)
        if staged is None:
            raise not_found(f"volume {vid} is not staged on this node")
        Unit = csi_pb2.VolumeUsage
        if Path(path).is_dir() and filesystem.mounted_at(path) is None:
            # statvfs here would report the disk under it (the kubelet's), not the volume.
            raise not_found(f"volume {vid} is not mounted at {path}")
        if Path(path).is_dir():
            fs = os.statvfs(path)
            usage = [
                Unit(
                    unit=Unit.BYTES,
                    total=fs.f_blocks * fs.f_frsize,
                    available=fs.f_bavail * fs.f_frsize,
                    used=(fs.f_blocks - fs.f_bfree) * fs.f_frsize,
                ),
                Unit(
                    unit=Unit.INODES,
                    total=fs.f_files,
                    available=fs.f_favail,
                    used=fs.f_files - fs.f_ffree,
                ),
            ]
        else:
            sectors = sysfs.block_sectors(sysfs.block_name(staged.device)) or 0
            usage = [Unit(unit=Unit.BYTES, total=sectors * 512)]
        down = [
            f"{nqn} via {t} {a}:{s} is {state}"
            for nqn in staged.nqns
            for t, a, s, state in sysfs.path_states(nqn)
            if state != "live"
        ]
        if not any(sysfs.path_states(nqn) for nqn in staged.nqns):
            down.append("no path is connected")
        for name in staged.md:
            state = mirror.array_state(name)
            if state is None:
                down.append(f"md array {name} is not assembled")
                continue
            behind = sorted(d for d, s in state.members.items() if s != mirrors.IN_SYNC)
            if behind or len(state.members) < len({k[1] for k in staged.members.values()}):
                missing = ", ".join(behind) or "a member is missing"
                down.append(f"md array {name} is degraded ({missing})")
        condition = csi_pb2.VolumeCondition(
            abnormal=bool(down), message="; ".join(down) or "all paths live"
        )
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    def NodeExpandVolume(self, request: Any, context: Any) -> csi_pb2.NodeExpandVolumeResponse:
        vid, path = request.volume_id, request.volume_path
        require(request, "volume_id", "volume_path")
        if not Path(path).exists():
            raise not_found(f"volume_path {path} does not exist")
        with self.locks.hold(vid):
            staged = self.load(vid)
            if staged is None:
                raise not_found(f"volume {vid} is not staged on this node")
            width = len(staged.md) or len(staged.nqns)
            per_leg = request.capacity_range.required_bytes // max(width, 1)
            if staged.md:
                per_leg += mirrors.DATA_OFFSET
                absent = [nqn for nqn in staged.nqns if not sysfs.namespace_device(nqn)]
                if absent:  # both replicas grow, or neither: md takes the smaller size
                    raise _fail(
                        grpc.StatusCode.UNAVAILABLE,
                        f"volume {vid} is a degraded mirror ({', '.join(absent)} not "
                        "connected): it grows once every replica is back",
                    )
            try:
                devices = self._grown_devices(staged.nqns, per_leg // 512)
                legs = devices
                if staged.md:
                    for name in staged.md:
                        mirror.grow(self.runner, name)
                    legs = [mirror.md_path(name) for name in staged.md]
                if staged.dm:
                    sizes = [sysfs.block_sectors(sysfs.block_name(d)) or 0 for d in legs]
                    assembly.ensure_striped(self.runner, staged.dm, legs, min(sizes), CHUNK_SECTORS)
                if not staged.block and staged.fstype:
                    filesystem.grow(self.runner, staged.device, path, staged.fstype)
            except (
                nvme.InitiatorError, assembly.AssemblyError, filesystem.FilesystemError,
                mirror.MirrorError,
            ) as exc:  # fmt: skip
                raise _fail(grpc.StatusCode.INTERNAL, f"expanding {vid}: {exc}") from None
            sectors = sysfs.block_sectors(sysfs.block_name(staged.device)) or 0
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=sectors * 512)

    def _grown_devices(self, nqns: list[str], sectors: int, timeout: float = 60) -> list[str]:
        """Each segment's device, once it shows at least `sectors` (the storage node grew
        it; the host reads the new size a moment after a rescan, not at once)."""
        for nqn in nqns:
            nvme.rescan(self.runner, nqn)
        devices = [f"/dev/{Path(sysfs.namespace_device(nqn) or nqn).name}" for nqn in nqns]

        def grown() -> bool:
            return all((sysfs.block_sectors(Path(d).name) or 0) >= sectors for d in devices)

        deadline = time.monotonic() + timeout
        while not grown():
            if time.monotonic() > deadline:
                raise _fail(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the segments of {', '.join(nqns)} do not show {sectors} sectors "
                    f"after {timeout:.0f} s: has ControllerExpandVolume finished?",
                )
            time.sleep(0.2)
        return devices

    # --- records ------------------------------------------------------------------------------

    def _state(self, vid: str) -> Path:
        return self.state_dir / f"{vid}.json"

    def _save(self, vid: str, staged: Staged) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state(vid).with_suffix(".tmp")
        tmp.write_text(json.dumps(staged.__dict__))
        tmp.replace(self._state(vid))

    def load(self, vid: str) -> Staged | None:
        try:
            return Staged(**json.loads(self._state(vid).read_text()))
        except FileNotFoundError:
            return None
