"""Where a volume's segments go: capacity-aware, every segment on a distinct ready node of
the pool, the emptiest nodes first (so capacity and bandwidth spread as nodes are added).

Space is counted from the Volume objects themselves (the sum of the segment sizes placed on
a node, snapshots included) against each node's thin pool, so two volumes placed one after
the other never count the same free space twice, whatever the agents have reported yet."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from flashmesh.core.resources import Snapshot, Volume
from flashmesh.core.units import format_bytes, parse_bytes


@dataclass(frozen=True)
class NodeSpace:
    name: str
    capacity: int  # the node's thin pool, in bytes
    used: int  # promised to segments and snapshots already placed there
    ready: bool

    @property
    def free(self) -> int:
        return max(self.capacity - self.used, 0)


class PlacementError(Exception):
    """kind: "never" (no pool of this shape could ever hold it) or "now" (not enough free
    space at the moment)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def largest_volume(nodes: list[NodeSpace], segments: int) -> int:
    """The largest volume of `segments` equal segments the pool could ever hold."""
    capacities = sorted((n.capacity for n in nodes), reverse=True)
    if len(capacities) < segments:
        return 0
    return capacities[segments - 1] * segments


def place(nodes: list[NodeSpace], segments: int, segment_size: int) -> list[str]:
    """The node of each segment, in segment order."""
    if largest_volume(nodes, segments) < segment_size * segments:
        raise PlacementError(
            "never",
            f"{segments} segment(s) of {format_bytes(segment_size)} need {segments} nodes "
            f"with that much space; the pool has {len(nodes)} node(s), able to hold "
            f"{format_bytes(largest_volume(nodes, segments))} at most",
        )
    ready = [n for n in nodes if n.ready and n.free >= segment_size]
    if len(ready) < segments:
        fits = (
            ", ".join(
                f"{n.name} {format_bytes(n.free)} free{'' if n.ready else ' (not ready)'}"
                for n in nodes
            )
            or "none"
        )
        raise PlacementError(
            "now",
            f"{segments} segment(s) of {format_bytes(segment_size)} need {segments} ready "
            f"node(s) with room; the pool's nodes: {fits}",
        )
    ready.sort(key=lambda n: (-n.free, n.name))
    return [n.name for n in ready[:segments]]


def space_used(volumes: list[Volume], snapshots: list[Snapshot]) -> dict[str, int]:
    """Bytes promised on each node: every segment placed there, and every thin snapshot
    of one (a snapshot can come to hold all of its origin's blocks)."""
    used: dict[str, int] = {}
    for volume in volumes:
        for seg in volume.spec.segments:
            used[seg.node] = used.get(seg.node, 0) + parse_bytes(seg.size)
    for snapshot in snapshots:
        count = max(len(snapshot.spec.segments), 1)
        for snap_seg in snapshot.spec.segments:
            share = -(-parse_bytes(snapshot.spec.size) // count)
            used[snap_seg.node] = used.get(snap_seg.node, 0) + share
    return used


def heartbeat_fresh(renew_time: str | None, duration_seconds: int, now: datetime) -> bool:
    """Whether a Lease renewed at renew_time (RFC 3339) still holds at now."""
    if not renew_time:
        return False
    renewed = datetime.fromisoformat(renew_time.replace("Z", "+00:00"))
    return now - renewed <= timedelta(seconds=duration_seconds)
