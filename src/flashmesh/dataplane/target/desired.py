"""What a storage node must export, decided from the Volume objects alone: one subsystem per
segment placed on the node (namespace 1 on the segment's logical volume, identifiers from
the volume id), allowed to exactly the volume's hosts, on one port per endpoint."""

from __future__ import annotations

from dataclasses import dataclass

from flashmesh.core import naming
from flashmesh.core.resources import Endpoint, Segment, SegmentStatus, Volume
from flashmesh.dataplane.target.model import PORT_ID_BASE, Host, Namespace, Port, Subsystem, Target


@dataclass(frozen=True)
class LocalSegment:
    """A segment of a volume that lives on this node."""

    volume: str
    segment: Segment

    @property
    def nqn(self) -> str:
        return naming.subsystem_nqn(self.volume, self.segment.index, self.segment.replica)

    @property
    def lv(self) -> str:
        return naming.segment_lv(self.volume, self.segment.index, self.segment.replica)


def local_segments(node: str, volumes: list[Volume]) -> list[LocalSegment]:
    """This node's segments of the volumes that are not being deleted."""
    return [
        LocalSegment(v.metadata.name, s)
        for v in sorted(volumes, key=lambda v: v.metadata.name)
        if v.metadata.deletion_timestamp is None
        for s in v.spec.segments
        if s.node == node
    ]


def desired_target(
    node: str,
    volumes: list[Volume],
    volume_group: str,
    endpoints: list[Endpoint],
    host_keys: dict[str, str] | None = None,
    blocked_hosts: frozenset[str] = frozenset(),
) -> Target:
    """host_keys, when the pool asks for DH-HMAC-CHAP, maps each host NQN to its secret;
    blocked_hosts (a host NQN shared by two nodes, a host without its key) may not connect,
    but those among a volume's hosts keep the controllers they have (kept_hosts)."""
    hosts_of = {v.metadata.name: frozenset(v.spec.hosts) - blocked_hosts for v in volumes}
    kept_of = {v.metadata.name: frozenset(v.spec.hosts) & blocked_hosts for v in volumes}
    target = Target()
    for seg in local_segments(node, volumes):
        namespace = Namespace(
            nsid=1,
            device_path=naming.lv_device(volume_group, seg.lv),
            device_uuid=naming.namespace_uuid(seg.nqn),
            device_nguid=naming.namespace_nguid(seg.nqn),
        )
        serial = naming.subsystem_serial(seg.volume, seg.segment.index, seg.segment.replica)
        allowed = hosts_of[seg.volume]
        target.subsystems[seg.nqn] = Subsystem(
            seg.nqn, serial, False, allowed, {1: namespace}, kept_hosts=kept_of[seg.volume]
        )
        for host in allowed:
            key = (host_keys or {}).get(host)
            target.hosts[host] = Host(host, dhchap_key=key)
    linked = frozenset(target.subsystems)
    for ep in endpoints:
        port_id = port_id_of(ep, endpoints)
        target.ports[port_id] = Port(
            port_id, ep.transport, ep.address, str(ep.port), subsystems=linked
        )
    return target


# Each transport has its own block of nvmet port ids, so one transport's endpoints coming
# and going (an RDMA link flap) never renumbers another's: a renumbered port is made anew,
# which drops every host connected through it.
TRANSPORT_BLOCK = {"tcp": 0, "rdma": 1}
PORTS_PER_TRANSPORT = 16


def port_id_of(endpoint: Endpoint, endpoints: list[Endpoint]) -> int:
    """The nvmet port id of an endpoint: its transport's block, then its place among that
    transport's addresses (tcp's first address keeps the id it always had)."""
    block = TRANSPORT_BLOCK.get(endpoint.transport, len(TRANSPORT_BLOCK))
    same = sorted({e.address for e in endpoints if e.transport == endpoint.transport})
    return PORT_ID_BASE + block * PORTS_PER_TRANSPORT + same.index(endpoint.address)


def segment_statuses(
    node: str,
    volumes: list[Volume],
    target: Target,
    endpoints: list[Endpoint],
    errors: dict[str, str],
    refused: dict[str, str] | None = None,
    sizes: dict[str, str] | None = None,
    held: dict[str, str] | None = None,
) -> dict[str, list[SegmentStatus]]:
    """Per volume, the status entries of this node's segments: ready once the subsystem is
    exported with its namespace enabled, on every endpoint, to exactly the allowed hosts,
    with no removed host still being cut off; otherwise a message says what is missing. A
    ready segment's message says which of the volume's hosts were refused (refused: host
    NQN -> why), since those are left out of its allowed hosts and listed as kept (their
    live controllers stay). sizes: each segment's logical volume size by subsystem NQN, as it is
    now. held: segments served as they were while a change of them failed, and why (a
    failed grow): ready, with that message."""
    out: dict[str, list[SegmentStatus]] = {}
    hosts_of = {v.metadata.name: v.spec.hosts for v in volumes}
    for seg in local_segments(node, volumes):
        sub = target.subsystems.get(seg.nqn)
        linked = all(seg.nqn in p.subsystems for p in target.ports.values()) and target.ports
        enabled = sub is not None and 1 in sub.namespaces and sub.namespaces[1].enable
        message = errors.get(seg.nqn)
        if message is None and not (sub and enabled and linked):
            message = "not exported yet"
        refused_here = {h for h in hosts_of[seg.volume] if h in (refused or {})}
        # A refused host may not connect again; the controllers it has are kept.
        kept = sorted(refused_here)
        cutting = sorted((sub.cutting_off if sub else frozenset()) - refused_here)
        if message is None and cutting:
            message = f"cutting off {', '.join(cutting)}: its live controllers are not ended yet"
        ready = message is None
        if ready:
            why = [
                (held or {}).get(seg.nqn, ""),
                *((refused or {})[h] for h in sorted(refused_here)),
            ]
            message = "; ".join(w for w in why if w) or None
        out.setdefault(seg.volume, []).append(
            SegmentStatus(
                index=seg.segment.index,
                replica=seg.segment.replica,
                node=node,
                ready=ready,
                subsystem_nqn=seg.nqn,
                endpoints=list(endpoints),
                hosts=sorted(sub.allowed_hosts) if sub else [],
                cutting_off=cutting or None,
                kept_hosts=kept or None,
                message=message,
                size=(sizes or {}).get(seg.nqn),
            )
        )
    return out
