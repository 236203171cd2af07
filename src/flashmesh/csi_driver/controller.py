"""The CSI Controller service: volumes and snapshots as Volume and Snapshot objects that
the storage agents serve, and host access (ControllerPublish) as the Volume's hosts.

Every call validates first, takes the volume's lock, and is idempotent: a repeat finds
the object it made (names derive from the CSI name) and waits, bounded, for the agents.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from flashmesh.core import mirrors, naming, params, resources, serde
from flashmesh.core.capacity import volume_size
from flashmesh.core.placement import PlacementError, largest_volume, place
from flashmesh.core.resources import Snapshot, StoragePool, Volume
from flashmesh.core.units import format_bytes, parse_bytes
from flashmesh.csi_driver import capabilities, orphans
from flashmesh.csi_driver._proto import csi_pb2, csi_pb2_grpc
from flashmesh.csi_driver.cluster import API, DELETE_CONFIRMED, Cluster, segments_missing
from flashmesh.csi_driver.errors import CsiError, invalid, not_found, require
from flashmesh.csi_driver.locks import VolumeLocks
from flashmesh.csi_driver.placement_lease import PlacementLease

log = logging.getLogger(__name__)
RPC = csi_pb2.ControllerServiceCapability.RPC
TOPOLOGY_KEY = resources.TOPOLOGY_KEY
MANAGER = "flashmesh-csi-controller"
PUBLISHED = f"{resources.GROUP}/published"
# The volume_context CreateVolume answered when it made the Volume: a repeat answers the
# same, and one asking for other parameters (transport, timeouts, queues) is refused.
VOLUME_CONTEXT = f"{resources.GROUP}/volume-context"
# Set (never removed) once a volume is published as a block device, and carried to its
# snapshots and copies: what was written to it as a raw device may be data that blkid does
# not recognise, so NodeStage must never format it (see capabilities.NO_FORMAT_CONTEXT).
RAW_BLOCK_DATA = f"{resources.GROUP}/raw-block-data"
Mode = csi_pb2.VolumeCapability.AccessMode
# A content source: its field in the Volume's spec, its size in bytes, and the node of each
# of its segments as (index, replica, node).
# A copy's source: its field in the Volume's spec, its size, where each of its segments
# sits, and whether it may hold data written as a raw block device.
Source = tuple[dict[str, str], int, list[tuple[int, int, str]], bool]


def _fail(code: grpc.StatusCode, message: str) -> CsiError:
    return CsiError(code, message)


def _access(request: Any) -> str:
    """The Volume's accessType: Block when any capability asked for is a block device."""
    caps = request.volume_capabilities
    return "Block" if any(c.WhichOneof("access_type") == "block" for c in caps) else "Filesystem"


def _raw(annotations: dict[str, str] | None) -> bool:
    return (annotations or {}).get(RAW_BLOCK_DATA) == "true"


def _context(chosen: params.VolumeParams, access_type: str, pool: StoragePool) -> dict[str, str]:
    """The volume_context CreateVolume answers: the parameters, the access type asked, and
    whether NodeStage must connect with the host's DH-HMAC-CHAP key."""
    context = chosen.context()
    if access_type:
        context["accessType"] = access_type
    if pool.spec.security.dhchap:
        context["dhchap"] = "true"
    return context


def _recorded_context(volume: Volume) -> dict[str, str]:
    """The volume_context recorded when the Volume was made (empty for an older one)."""
    text = (volume.metadata.annotations or {}).get(VOLUME_CONTEXT)
    try:
        found = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def _raw_mark(raw: bool) -> dict[str, str]:
    """The annotations of a copy whose source may hold raw block data (none otherwise)."""
    return {RAW_BLOCK_DATA: "true"} if raw else {}


def _mark_raw(data: dict[str, Any]) -> bool:
    """Marks a Volume object as published as a block device; False when it already was."""
    annotations = data["metadata"].get("annotations") or {}
    if _raw(annotations):
        return False
    data["metadata"]["annotations"] = {**annotations, **_raw_mark(True)}
    return True


def _copied_volume(source: Any) -> str | None:
    """The volume a CreateVolume clones, if it clones one (not a snapshot restore)."""
    return str(source.volume.volume_id) if source.WhichOneof("type") == "volume" else None


def publish_context(volume: Volume) -> dict[str, str]:
    """What NodeStage needs to connect: each segment's subsystem and endpoints, in stripe
    order (replicas of one index together), with its place and node. No secret: the CO
    keeps this in the VolumeAttachment."""
    statuses = (
        {(s.index, s.replica): s for s in (volume.status.segments or [])} if volume.status else {}
    )
    segments = []
    for seg in sorted(volume.spec.segments, key=lambda s: (s.index, s.replica)):
        status = statuses[(seg.index, seg.replica)]
        endpoints = [f"{e.transport}:{e.address}:{e.port}" for e in status.endpoints or []]
        segments.append({"nqn": status.subsystem_nqn, "endpoints": endpoints,
                         "index": seg.index, "replica": seg.replica, "node": seg.node})  # fmt: skip
    return {"segments": json.dumps(segments, separators=(",", ":"))}


@dataclass
class Controller(csi_pb2_grpc.ControllerServicer):
    cluster: Cluster
    fabric: str = "default"
    locks: VolumeLocks = field(default_factory=VolumeLocks)

    # One placement at a time among every controller of the cluster (None: made from the
    # cluster's client and namespace).
    placement: PlacementLease | None = None

    def __post_init__(self) -> None:
        # Placement reads free space and then writes a Volume: one at a time, so two
        # volumes never count the same space; the lock in this process, the Lease among
        # processes (placement_lease.py).
        self._placing = threading.Lock()
        if self.placement is None:
            self.placement = PlacementLease(self.cluster.kube, self.cluster.namespace)

    @contextmanager
    def _place(self) -> Iterator[bool]:
        """Held while placing; yields whether the caches count every placement."""
        assert self.placement is not None
        with self._placing, self.placement.held() as knows_all:
            yield knows_all

    # --- volumes ------------------------------------------------------------------------

    def CreateVolume(self, request: Any, context: Any) -> csi_pb2.CreateVolumeResponse:
        require(request, "name")
        capabilities.check(list(request.volume_capabilities))
        chosen = params.parse(dict(request.parameters))  # names a missing or bad parameter
        vid = naming.volume_id(request.name)
        # A repeat answers from the cache; a new volume reads its pool from the API server.
        pool = self.cluster.pool(chosen.pool, fresh=not self.cluster.has_volume(vid))
        chosen = params.parse(dict(request.parameters), pool.spec.layout)
        for cap in request.volume_capabilities:
            why = capabilities.mirror_problem(cap, chosen.layout.replicas)
            if why:
                raise invalid(f"volume_capabilities: {why}")
        self._check_topology(request.accessibility_requirements)
        rng = request.capacity_range
        default = parse_bytes(pool.spec.default_volume_size)
        copied = _copied_volume(request.volume_content_source)
        # A clone holds its source's lock too, until the agents report the copy made: no
        # ControllerPublish of the source can land between the check below and the copy.
        with self.locks.hold(vid), self._hold_source(copied):
            source = self._source(request.volume_content_source, chosen)
            size = volume_size(
                rng.required_bytes, rng.limit_bytes, default, chosen.layout.stripe_width
            )
            if source and size < source[1]:
                # A copy holds at least its source (the same layout keeps it aligned).
                if rng.limit_bytes and source[1] > rng.limit_bytes:
                    raise _fail(
                        grpc.StatusCode.OUT_OF_RANGE,
                        f"capacity_range: the source holds {source[1]} bytes, more than "
                        f"limit_bytes {rng.limit_bytes}",
                    )
                size = source[1]
            volume = self.cluster.volume(vid)
            made = volume is None
            if volume is None:
                self._refuse_torn_copy(copied, "clone")
                access = _access(request)
                context = _context(chosen, access, pool)
                claim = orphans.claim_of(dict(request.parameters))
                volume = self._make(vid, request.name, chosen, size, source, access, context, claim)
            else:
                self._same(volume, request, chosen, source)
            self.cluster.wait(f"volume {vid}", lambda: segments_missing(self.cluster.volume(vid)))
            if made:
                self._recheck_copy(copied, "clone", "Volume", vid)
            out = self._csi_volume(volume, chosen, request)
            # A Volume made before the record is answered as it was then.
            recorded = _recorded_context(volume)
            out.volume_context.update(
                recorded or _context(chosen, volume.spec.access_type or "", pool)
            )
            return csi_pb2.CreateVolumeResponse(volume=out)

    def _check_topology(self, requirement: Any) -> None:
        wanted = [
            t
            for t in [*requirement.requisite, *requirement.preferred]
            if TOPOLOGY_KEY in t.segments
        ]
        if wanted and all(t.segments[TOPOLOGY_KEY] != self.fabric for t in wanted):
            raise _fail(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"accessibility_requirements: this controller serves fabric "
                f"{self.fabric!r}, not {wanted[0].segments[TOPOLOGY_KEY]!r}",
            )

    def _hold_source(self, source: str | None) -> contextlib.AbstractContextManager[None]:
        return self.locks.hold(source) if source else contextlib.nullcontext()

    def _refuse_torn_copy(self, source: str | None, what: str) -> None:
        """Thin snapshots of several segments are not taken at one instant: a striped
        volume is copied (snapshot or clone) only while no host can write it."""
        volume = self.cluster.volume(source) if source else None
        if volume is not None and len(volume.spec.segments) > 1 and volume.spec.hosts:
            raise _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"volume {source} is striped over {len(volume.spec.segments)} segments and "
                f"published to {', '.join(volume.spec.hosts)}: its segments' copies would "
                f"not be taken at one instant; unpublish it, then {what} it",
            )

    def _recheck_copy(self, source: str | None, what: str, kind: str, name: str) -> None:
        """After the agents made the copy: had the source been published meanwhile (the
        lock keeps this controller's own calls out; this catches any other writer), the
        copy may be torn, so it is removed again and the call refused."""
        try:
            self._refuse_torn_copy(source, what)
        except CsiError:
            self.cluster.kube.delete(API, kind, name)
            raise

    def _source(self, source: Any, chosen: params.VolumeParams) -> Source | None:
        """The content source: its field in the Volume's spec, its size, and where each
        of its segments sits (a copy's segments go to the same nodes)."""
        kind = source.WhichOneof("type")
        if kind is None:
            return None
        if kind == "snapshot":
            sid = source.snapshot.snapshot_id
            snap = self.cluster.snapshot(sid)
            if snap is None:
                raise not_found(f"volume_content_source: snapshot {sid} does not exist")
            origin = self.cluster.volume(snap.spec.source_volume)
            layout = origin.spec.layout if origin else None
            pool = origin.spec.pool if origin else chosen.pool
            where = [(s.index, s.replica, s.node) for s in snap.spec.segments]
            spec, size = {"snapshot": sid}, parse_bytes(snap.spec.size)
            raw = _raw(snap.metadata.annotations)
        else:
            vid = source.volume.volume_id
            origin = self.cluster.volume(vid)
            if origin is None:
                raise not_found(f"volume_content_source: volume {vid} does not exist")
            layout, pool = origin.spec.layout, origin.spec.pool
            where = [(s.index, s.replica, s.node) for s in origin.spec.segments]
            spec, size = {"volume": vid}, parse_bytes(origin.spec.size)
            raw = _raw(origin.metadata.annotations)
        if chosen.layout.replicas > 1 or (layout is not None and layout.replicas > 1):
            raise invalid(
                "volume_content_source: mirrored volumes are neither copied nor restored "
                'yet: use a class with replicas: "1" for the copy and its source'
            )
        if pool != chosen.pool or (layout is not None and layout != chosen.layout):
            raise invalid(
                f"volume_content_source: the source is in pool {pool} with "
                f"{layout.stripe_width if layout else '?'} stripe(s); a copy keeps its pool "
                f"and layout (asked: pool {chosen.pool}, {chosen.layout.stripe_width} stripe(s))"
            )
        return spec, size, where, raw

    def _make(
        self,
        vid: str,
        name: str,
        chosen: params.VolumeParams,
        size: int,
        source: Source | None,
        access_type: str,
        context: dict[str, str],
        claim: str | None = None,
    ) -> Volume:
        layout = chosen.layout
        count = layout.stripe_width * layout.replicas
        segment = mirrors.segment_bytes(size, layout.stripe_width, layout.replicas)
        with self._place() as knows_all:
            space = self.cluster.space(chosen.pool, fresh=not knows_all)
            if source is None:
                nodes = place(space, count, segment)
            else:
                nodes = self._source_nodes(space, source[2])
                # The copy grows past its source: the nodes must have room for the growth.
                for node in nodes:
                    room = next((n.free for n in space if n.name == node), 0)
                    if room < segment:
                        raise PlacementError(
                            "now",
                            f"{node} has {format_bytes(room)} free, "
                            f"a copy's segment needs {format_bytes(segment)}",
                        )
            spec: dict[str, Any] = {
                "csiName": name,
                "pool": chosen.pool,
                "size": format_bytes(size),
                "layout": {"stripeWidth": layout.stripe_width, "replicas": layout.replicas},
                "segments": [
                    {
                        "index": i % layout.stripe_width,
                        "replica": i // layout.stripe_width,
                        "node": node,
                        "size": format_bytes(segment),
                    }
                    for i, node in enumerate(nodes)
                ],
                "hosts": [],
                "accessType": access_type,
            }
            # Labelled by node, so each agent watches only the volumes it serves.
            annotations = {VOLUME_CONTEXT: json.dumps(context, sort_keys=True)}
            if claim:  # the PVC it is for: a Volume no claim will own is collected (orphans.py)
                annotations[orphans.CLAIM] = claim
            meta: dict[str, Any] = {"name": vid, "labels": naming.node_labels(nodes),
                                    "annotations": annotations}  # fmt: skip
            if source:
                spec["source"] = source[0]
                annotations.update(_raw_mark(source[3]))
            body = {"apiVersion": API, "kind": "Volume", "metadata": meta, "spec": spec}
            return Volume.from_dict(self.cluster.create(body))

    def _source_nodes(self, space: list[Any], where: list[tuple[int, int, str]]) -> list[str]:
        ready = {n.name for n in space if n.ready}
        nodes = [node for _, _, node in sorted(where)]
        down = [n for n in nodes if n not in ready]
        if down:
            raise _fail(
                grpc.StatusCode.UNAVAILABLE,
                f"the source's segments sit on {', '.join(down)}, which is not ready; "
                "a copy must be made on its source's nodes",
            )
        return nodes

    def _same(
        self,
        volume: Volume,
        request: Any,
        chosen: params.VolumeParams,
        source: Source | None,
    ) -> None:
        """A repeat of CreateVolume must ask for what exists."""
        size = parse_bytes(volume.spec.size)
        rng = request.capacity_range
        problems = []
        if volume.spec.csi_name != request.name:
            problems.append(f"its id is taken by CSI volume {volume.spec.csi_name}")
        if volume.spec.pool != chosen.pool or volume.spec.layout != chosen.layout:
            problems.append("it exists with another pool or layout")
        if size < rng.required_bytes or (rng.limit_bytes and size > rng.limit_bytes):
            problems.append(f"it exists with {size} bytes, outside the capacity_range asked")
        have = serde.to_dict(volume.spec.source) if volume.spec.source else None
        if have != (source[0] if source else None):
            problems.append("it exists with another content source")
        recorded = _recorded_context(volume)
        asked = chosen.context()
        # Pool and layout are checked above; access type and authentication are not asked.
        keys = ({*asked, *recorded} - {"pool", "stripeWidth", "replicas", "accessType",
                                       "dhchap"}) if recorded else set()  # fmt: skip
        for key in sorted(keys):
            if recorded.get(key) != asked.get(key):
                had, want = recorded.get(key, "unset"), asked.get(key, "unset")
                problems.append(f"it exists with parameter {key} {had}, not {want}")
        if problems:
            raise _fail(
                grpc.StatusCode.ALREADY_EXISTS, f"volume {request.name}: {'; '.join(problems)}"
            )

    def _csi_volume(
        self, volume: Volume, chosen: params.VolumeParams | None, request: Any = None
    ) -> csi_pb2.Volume:
        out = csi_pb2.Volume(
            capacity_bytes=parse_bytes(volume.spec.size),
            volume_id=volume.metadata.name,
            accessible_topology=[csi_pb2.Topology(segments={TOPOLOGY_KEY: self.fabric})],
        )
        if chosen:
            out.volume_context.update(chosen.context())
        if request is not None and request.HasField("volume_content_source"):
            out.content_source.CopyFrom(request.volume_content_source)
        return out

    def DeleteVolume(self, request: Any, context: Any) -> csi_pb2.DeleteVolumeResponse:
        vid = request.volume_id
        require(request, "volume_id")
        with self.locks.hold(vid):
            volume = self.cluster.volume(vid)
            if volume is None:
                return csi_pb2.DeleteVolumeResponse()
            if volume.spec.hosts:
                raise _fail(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"volume {vid} is still published to {', '.join(volume.spec.hosts)}: "
                    "unpublish it first",
                )
            if DELETE_CONFIRMED not in (volume.metadata.annotations or {}):
                # The chart's admission policy refuses to delete a Volume that a
                # PersistentVolume names (Kubernetes calls this while its PV still exists)
                # unless it carries this mark: a deletion asked through CSI.
                self.cluster.kube.patch(
                    API, "Volume", vid, {"metadata": {"annotations": {DELETE_CONFIRMED: "csi"}}}
                )
            self.cluster.kube.delete(API, "Volume", vid)
            self.cluster.wait(
                f"deleting volume {vid}",
                lambda: None if self.cluster.volume(vid) is None else "agents still removing it",
            )
        return csi_pb2.DeleteVolumeResponse()

    # --- access ---------------------------------------------------------------------------

    def ControllerPublishVolume(
        self, request: Any, context: Any
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        vid, host = request.volume_id, request.node_id
        require(request, "volume_id", "node_id", "volume_capability")
        capabilities.check([request.volume_capability], "volume_capability")
        with self.locks.hold(vid):
            volume = self.cluster.volume(vid)
            if volume is None:
                raise not_found(f"volume {vid} does not exist")
            why = capabilities.mirror_problem(
                request.volume_capability, volume.spec.layout.replicas
            )
            if why:
                raise invalid(f"volume_capability: {why}")
            nodes = self.cluster.nodes_with_host(host)
            if not nodes:
                raise not_found(
                    f"no node has node id {host}: is FlashMesh's node plugin "
                    "registered there (its CSINode)?"
                )
            if len(nodes) > 1:
                message = (
                    f"node id {host} is claimed by nodes {', '.join(nodes)}: two hosts "
                    "with one NQN would corrupt the volume; give each node its own "
                    "SMBIOS UUID"
                )
                self._event(vid, "DuplicateHostNQN", message)
                raise _fail(grpc.StatusCode.FAILED_PRECONDITION, message)
            mode = request.volume_capability.access_mode.mode
            others = [h for h in volume.spec.hosts if h != host]
            if others and mode in capabilities.SINGLE_NODE:
                raise _fail(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"volume {vid} is published to {', '.join(others)} and asked "
                    "for single-node access: unpublish it there first",
                )

            asked = {"readonly": request.readonly, "mode": Mode.Mode.Name(mode)}
            block = request.volume_capability.WhichOneof("access_type") == "block"

            def allow(data: dict[str, Any]) -> bool:
                hosts = data["spec"].setdefault("hosts", [])
                published = _published(data)
                if host in hosts and published.get(host, asked) != asked:
                    raise _fail(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"volume {vid} is published to {host} as {published[host]}, not as "
                        f"{asked}: unpublish it there first",
                    )
                marked = block and _mark_raw(data)
                if host in hosts and host in published:
                    return marked
                if host not in hosts:
                    hosts.append(host)
                published[host] = asked
                _set_published(data, published)
                return True

            self.cluster.edit_volume(vid, allow)
            self.cluster.wait(
                f"publishing {vid} to {host}",
                lambda: segments_missing(self.cluster.volume(vid), host=host),
            )
            served = self.cluster.volume(vid)
            assert served is not None
            context = publish_context(served)
            if request.readonly:
                # The spec: the SP MUST publish the volume read-only; the node enforces it.
                context[capabilities.READONLY_CONTEXT] = "true"
            if not block and _raw(served.metadata.annotations):
                context[capabilities.NO_FORMAT_CONTEXT] = "true"
            return csi_pb2.ControllerPublishVolumeResponse(publish_context=context)

    def ControllerUnpublishVolume(
        self, request: Any, context: Any
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        vid, host = request.volume_id, request.node_id
        require(request, "volume_id")
        with self.locks.hold(vid):
            volume = self.cluster.volume(vid)
            if volume is None:
                return csi_pb2.ControllerUnpublishVolumeResponse()
            gone = [host] if host else list(volume.spec.hosts)

            def deny(data: dict[str, Any]) -> bool:
                hosts: list[str] = data["spec"].get("hosts") or []
                kept = [h for h in hosts if h not in gone]
                data["spec"]["hosts"] = kept
                published = _published(data)
                _set_published(data, {h: a for h, a in published.items() if h not in gone})
                return kept != hosts or len(published) != len(_published(data))

            self.cluster.edit_volume(vid, deny)
            for removed in gone:
                # Returns once the agents report the host removed and cut off.
                self._wait_gone(vid, removed)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    def _wait_gone(self, vid: str, host: str) -> None:
        self.cluster.wait(
            f"unpublishing {vid} from {host}",
            lambda: host_not_cut_off(self.cluster.volume(vid), host),
        )

    def ValidateVolumeCapabilities(
        self, request: Any, context: Any
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        require(request, "volume_id", "volume_capabilities")
        volume = self.cluster.volume(request.volume_id)
        if volume is None:
            raise not_found(f"volume {request.volume_id} does not exist")
        for cap in request.volume_capabilities:
            why = capabilities.problem(cap) or capabilities.mirror_problem(
                cap, volume.spec.layout.replicas
            )
            if why:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=why)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    # --- listing and capacity --------------------------------------------------------------

    def ListVolumes(self, request: Any, context: Any) -> csi_pb2.ListVolumesResponse:
        volumes = sorted(self.cluster.volumes(), key=lambda v: v.metadata.name)
        page, token = _page(volumes, request.max_entries, request.starting_token)
        entries = [
            csi_pb2.ListVolumesResponse.Entry(
                volume=self._csi_volume(v, None),
                status=csi_pb2.ListVolumesResponse.VolumeStatus(
                    published_node_ids=v.spec.hosts, volume_condition=_condition(v)
                ),
            )
            for v in page
        ]
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=token)

    def ControllerGetVolume(
        self, request: Any, context: Any
    ) -> csi_pb2.ControllerGetVolumeResponse:
        require(request, "volume_id")
        volume = self.cluster.volume(request.volume_id)
        if volume is None:
            raise not_found(f"volume {request.volume_id} does not exist")
        status = csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
            published_node_ids=volume.spec.hosts, volume_condition=_condition(volume)
        )
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._csi_volume(volume, None), status=status
        )

    def GetCapacity(self, request: Any, context: Any) -> csi_pb2.GetCapacityResponse:
        for cap in request.volume_capabilities:
            if capabilities.problem(cap):
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        topology = request.accessible_topology.segments
        if TOPOLOGY_KEY in topology and topology[TOPOLOGY_KEY] != self.fabric:
            return csi_pb2.GetCapacityResponse(available_capacity=0)
        if "pool" in request.parameters:
            pool = self.cluster.pool(request.parameters["pool"])
            chosen = params.parse(dict(request.parameters), pool.spec.layout)
            space = [n for n in self.cluster.space(pool.metadata.name) if n.ready]
            count = chosen.layout.stripe_width * chosen.layout.replicas
        else:  # no class named: what every pool could give one single-segment volume
            space = [n for name in self.cluster.pools() for n in self.cluster.space(name)
                     if n.ready]  # fmt: skip
            count = 1
        frees = sorted((n.free for n in space), reverse=True)
        largest = frees[count - 1] * count if len(frees) >= count else 0
        if "pool" in request.parameters and chosen.layout.replicas > 1 and len(frees) >= count:
            per_index = max(0, frees[count - 1] - mirrors.DATA_OFFSET)
            largest = per_index * chosen.layout.stripe_width
        response = csi_pb2.GetCapacityResponse(available_capacity=sum(n.free for n in space))
        response.maximum_volume_size.value = largest
        return response

    def ControllerGetCapabilities(
        self, request: Any, context: Any
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        kinds = [
            RPC.CREATE_DELETE_VOLUME,
            RPC.PUBLISH_UNPUBLISH_VOLUME,
            RPC.LIST_VOLUMES,
            RPC.GET_CAPACITY,
            RPC.CREATE_DELETE_SNAPSHOT,
            RPC.LIST_SNAPSHOTS,
            RPC.CLONE_VOLUME,
            RPC.PUBLISH_READONLY,
            RPC.EXPAND_VOLUME,
            RPC.LIST_VOLUMES_PUBLISHED_NODES,
            RPC.VOLUME_CONDITION,
            RPC.GET_VOLUME,
            RPC.SINGLE_NODE_MULTI_WRITER,
        ]
        caps = [csi_pb2.ControllerServiceCapability(rpc=RPC(type=k)) for k in kinds]
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=caps)

    # --- expansion ------------------------------------------------------------------------

    def ControllerExpandVolume(
        self, request: Any, context: Any
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        vid = request.volume_id
        require(request, "volume_id", "capacity_range")
        if request.HasField("volume_capability"):
            capabilities.check([request.volume_capability], "volume_capability")
        with self.locks.hold(vid):
            volume = self.cluster.volume(vid)
            if volume is None:
                raise not_found(f"volume {vid} does not exist")
            current = parse_bytes(volume.spec.size)
            layout = volume.spec.layout
            rng = request.capacity_range
            size = volume_size(rng.required_bytes, rng.limit_bytes, current, layout.stripe_width)
            block = request.volume_capability.WhichOneof("access_type") == "block"
            if size > current:
                self._grow(volume, size)
            else:
                # A retry of a grow already asked (a storage node was down): OK only once
                # every segment has its size, or the resizer would call the PV grown early.
                size = current
                segment = mirrors.segment_bytes(size, layout.stripe_width, layout.replicas)
                self.cluster.wait(
                    f"growing volume {vid}",
                    lambda: segments_missing(self.cluster.volume(vid), size=segment),
                )
            # A block volume needs the node only where the node assembled it (a dm stripe
            # or md mirror takes its legs' new size when told); a lone namespace grows alone.
            assembled = layout.stripe_width > 1 or layout.replicas > 1
            return csi_pb2.ControllerExpandVolumeResponse(
                capacity_bytes=size, node_expansion_required=not block or assembled
            )

    def _grow(self, volume: Volume, size: int) -> None:
        vid = volume.metadata.name
        count = len(volume.spec.segments)
        layout = volume.spec.layout
        segment = mirrors.segment_bytes(size, layout.stripe_width, layout.replicas)
        with self._place() as knows_all:
            space = {n.name: n for n in self.cluster.space(volume.spec.pool, not knows_all)}
            everything = largest_volume(list(space.values()), count)
            if size > everything:
                raise _fail(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"capacity_range: {size} bytes is more than the pool could ever "
                    f"hold in {count} segment(s) ({everything} bytes)",
                )
            for seg in volume.spec.segments:
                node = space.get(seg.node)
                more = segment - parse_bytes(seg.size)
                if node is None or node.free < more:
                    free = format_bytes(node.free) if node else "nothing"
                    raise _fail(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{seg.node} has {free} free; growing segment {seg.index} "
                        f"needs {format_bytes(more)} more",
                    )

            def grow(data: dict[str, Any]) -> bool:
                data["spec"]["size"] = format_bytes(size)
                for seg in data["spec"]["segments"]:
                    seg["size"] = format_bytes(segment)
                return True

            self.cluster.edit_volume(vid, grow)
        self.cluster.wait(
            f"growing volume {vid}",
            lambda: segments_missing(self.cluster.volume(vid), size=segment),
        )

    # --- snapshots --------------------------------------------------------------------------

    def CreateSnapshot(self, request: Any, context: Any) -> csi_pb2.CreateSnapshotResponse:
        require(request, "name", "source_volume_id")
        source = request.source_volume_id
        sid = naming.snapshot_id(request.name)
        # The source's lock too, as for a clone: no publish between the check and the copy.
        with self.locks.hold(sid), self.locks.hold(source):
            snap = self.cluster.snapshot(sid)
            made = snap is None
            if snap is not None:
                if snap.spec.source_volume != source or snap.spec.csi_name != request.name:
                    raise _fail(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"snapshot {request.name} exists with source volume "
                        f"{snap.spec.source_volume}",
                    )
            else:
                volume = self.cluster.volume(source)
                if volume is None:
                    raise not_found(f"source_volume_id: volume {source} does not exist")
                if volume.spec.layout.replicas > 1:
                    raise _fail(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"volume {source} is mirrored (replicas: {volume.spec.layout.replicas})"
                        ": snapshots of mirrored volumes are not supported yet; snapshot a "
                        'volume of a class with replicas: "1"',
                    )
                self._refuse_torn_copy(source, "snapshot")
                snap = self._make_snapshot(sid, request.name, volume)
            self.cluster.wait(f"snapshot {sid}", lambda: self._snapshot_missing(sid))
            if made:
                self._recheck_copy(source, "snapshot", "Snapshot", sid)
            done = self.cluster.snapshot(sid)
            assert done is not None
            if not (done.status and done.status.ready_to_use):
                done = self.cluster.mark_snapshot_ready(sid, MANAGER)
            return csi_pb2.CreateSnapshotResponse(snapshot=_csi_snapshot(done))

    def _make_snapshot(self, sid: str, name: str, volume: Volume) -> Snapshot:
        segments = [
            {
                "index": s.index,
                "replica": s.replica,
                "node": s.node,
                "thinVolume": naming.segment_lv(sid, s.index, s.replica),
            }
            for s in volume.spec.segments
        ]
        body = {
            "apiVersion": API,
            "kind": "Snapshot",
            "metadata": {
                "name": sid,
                "annotations": _raw_mark(_raw(volume.metadata.annotations)),
                "labels": naming.node_labels([s.node for s in volume.spec.segments]),
            },
            "spec": {
                "csiName": name,
                "sourceVolume": volume.metadata.name,
                "size": volume.spec.size,
                "segments": segments,
            },
        }
        return Snapshot.from_dict(self.cluster.create(body))

    def _snapshot_missing(self, sid: str) -> str | None:
        snap = self.cluster.snapshot(sid)
        if snap is None:
            return "the Snapshot object is gone"
        if snap.status and snap.status.ready_to_use:
            return None
        done = {
            (s.index, s.replica): s for s in (snap.status.segments if snap.status else []) or []
        }
        for seg in snap.spec.segments:
            status = done.get((seg.index, seg.replica))
            if status is None or not status.ready:
                why = status.message if status and status.message else "not taken yet"
                return f"segment {seg.index}/{seg.replica} on {seg.node}: {why}"
        return None  # every segment taken: the caller marks it ready to use

    def DeleteSnapshot(self, request: Any, context: Any) -> csi_pb2.DeleteSnapshotResponse:
        sid = request.snapshot_id
        require(request, "snapshot_id")
        with self.locks.hold(sid):
            if self.cluster.snapshot(sid) is not None:
                self.cluster.kube.delete(API, "Snapshot", sid)
                self.cluster.wait(
                    f"deleting snapshot {sid}",
                    lambda: (
                        None if self.cluster.snapshot(sid) is None else "agents still removing it"
                    ),
                )
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(self, request: Any, context: Any) -> csi_pb2.ListSnapshotsResponse:
        snaps = sorted(self.cluster.snapshots(), key=lambda s: s.metadata.name)
        if request.snapshot_id:
            snaps = [s for s in snaps if s.metadata.name == request.snapshot_id]
        if request.source_volume_id:
            snaps = [s for s in snaps if s.spec.source_volume == request.source_volume_id]
        page, token = _page(snaps, request.max_entries, request.starting_token)
        entries = [csi_pb2.ListSnapshotsResponse.Entry(snapshot=_csi_snapshot(s)) for s in page]
        return csi_pb2.ListSnapshotsResponse(entries=entries, next_token=token)

    def _event(self, vid: str, reason: str, message: str) -> None:
        data = self.cluster.kube.get(API, "Volume", vid)
        if data:
            self.cluster.kube.event(data, reason, message, warning=True, component=MANAGER)


def _published(data: dict[str, Any]) -> dict[str, Any]:
    """How each host was published (read-only or not, the access mode), so a repeat that
    asks for something else is told ALREADY_EXISTS."""
    annotations = data["metadata"].get("annotations") or {}
    found: dict[str, Any] = json.loads(annotations.get(PUBLISHED, "{}"))
    return found


def _set_published(data: dict[str, Any], published: dict[str, Any]) -> None:
    annotations = data["metadata"].setdefault("annotations", {}) or {}
    data["metadata"]["annotations"] = annotations
    if published:
        annotations[PUBLISHED] = json.dumps(published, sort_keys=True, separators=(",", ":"))
    else:
        annotations.pop(PUBLISHED, None)


def host_not_cut_off(volume: Volume | None, host: str) -> str | None:
    """Whether an agent still reports the host allowed on a segment, or still being cut off
    or kept (its live controllers not known to be ended); a segment never exported never let
    it in."""
    statuses = (volume.status.segments if volume and volume.status else None) or []
    allowed = [f"{s.index}/{s.replica} on {s.node}" for s in statuses if host in (s.hosts or [])]
    cutting = [
        f"{s.index}/{s.replica} on {s.node}"
        for s in statuses
        if host in (s.cutting_off or []) or host in (s.kept_hosts or [])
    ]
    if allowed:
        return f"{host} still allowed on segment(s) {', '.join(allowed)}"
    if cutting:
        return f"{host} still being cut off from segment(s) {', '.join(cutting)}"
    return None


def _condition(volume: Volume) -> csi_pb2.VolumeCondition:
    missing = segments_missing(volume)
    if missing is not None:
        return csi_pb2.VolumeCondition(abnormal=True, message=missing)
    conditions = (volume.status.conditions or []) if volume.status else []
    mirrored = next((c for c in conditions if c.type == mirrors.CONDITION), None)
    if mirrored is not None and mirrored.status != "True":
        return csi_pb2.VolumeCondition(abnormal=True, message=mirrored.message or mirrored.reason)
    return csi_pb2.VolumeCondition(abnormal=False, message="serving")


def _csi_snapshot(snap: Snapshot) -> csi_pb2.Snapshot:
    out = csi_pb2.Snapshot(
        size_bytes=parse_bytes(snap.spec.size),
        snapshot_id=snap.metadata.name,
        source_volume_id=snap.spec.source_volume,
        ready_to_use=bool(snap.status and snap.status.ready_to_use),
    )
    created = (
        snap.status.creation_time if snap.status else None
    ) or snap.metadata.creation_timestamp
    if created:
        stamp = Timestamp()
        stamp.FromDatetime(datetime.fromisoformat(created.replace("Z", "+00:00")))
        out.creation_time.CopyFrom(stamp)
    return out


def _order(item: Any) -> str:
    """Oldest first, then by name: a volume made between two pages sorts after both, and
    a token keeps working when the item it names is deleted."""
    return f"{item.metadata.creation_timestamp or ''}|{item.metadata.name}"


def _page(items: list[Any], max_entries: int, token: str) -> tuple[list[Any], str]:
    """A page of the items after the token (the last item of the previous page)."""
    if max_entries < 0:
        raise invalid("max_entries must not be negative")
    ordered = sorted(items, key=_order)
    if token:
        if "|" not in token:
            raise _fail(
                grpc.StatusCode.ABORTED, f"starting_token {token!r} is not valid: list again"
            )
        ordered = [item for item in ordered if _order(item) > token]
    page = ordered[:max_entries] if max_entries else ordered
    more = len(page) < len(ordered)
    return page, _order(page[-1]) if more and page else ""


__all__ = ["TOPOLOGY_KEY", "Controller", "publish_context"]
