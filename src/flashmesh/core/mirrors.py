"""Mirrored volumes (replicas > 1): decisions only; the node plugin acts on them.

A mirrored volume's segments of one stripe index are the replicas of each other, on
distinct storage nodes. The node plugin assembles them as an md RAID1 with an internal
write-intent bitmap, one array per index (and stripes the arrays when the width is above
1). md handles a lost member on its own: writes go on to the others, and a member that
comes back is re-added and resynced only where the bitmap says it missed writes. md also
refuses a stale member when a fresher one is present (event counts). What md cannot know
is that a member is stale when it is the only one left: so the Volume's status records
which replicas are in sync, with md's event count and a generation raised on every change
of the in-sync members, the node plugin updates it on every degrade and resync, and
NodeStage never assembles an index from replicas that are not in sync at the newest
generation, nor from a member whose own event count is below the one recorded
(UNAVAILABLE rather than silently rolling back acknowledged writes).

Known window: md holds writes only until its own superblocks record a failed member; the
Volume's record follows when the node plugin's monitor wakes on md's change (README,
"Failure behaviour"). Losing the GPU node and the fresh replica's node together inside that
window could still leave a stale replica looking in sync."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

# Bytes in front of the data on each member: md's 1.2 superblock (at 4 KiB) and its
# internal bitmap. Fixed (mdadm --data-offset) so the data's place never depends on the
# mdadm version, and added to each replica segment so a volume holds what it promised.
DATA_OFFSET = 8 << 20
MAX_REPLICAS = 2
MD_NAME_MAX = 32  # md's name field in the 1.2 superblock

CONDITION = "ReplicasInSync"  # the Volume condition the node plugin keeps

IN_SYNC = "InSync"
RECOVERING = "Recovering"
FAULTY = "Faulty"
MISSING = "Missing"

Key = tuple[int, int]  # (index, replica)


def segment_bytes(size: int, stripe_width: int, replicas: int) -> int:
    """Bytes of each segment of a volume of `size` bytes."""
    per_index = size // stripe_width
    return per_index + DATA_OFFSET if replicas > 1 else per_index


def md_name(volume_id: str, index: int) -> str:
    name = f"{volume_id}-s{index}"
    if len(name) > MD_NAME_MAX:
        raise ValueError(f"md name {name} is longer than {MD_NAME_MAX} characters")
    return name


def member_state(flags: str) -> str:
    """One member's state from md's sysfs dev-*/state (comma-separated flags)."""
    words = set(flags.strip().split(","))
    if "faulty" in words:
        return FAULTY
    if "in_sync" in words:
        return IN_SYNC
    return RECOVERING  # a spare being rebuilt (or waiting to be)


def index_states(members: Mapping[int, str], replicas: int) -> dict[int, str]:
    """Every replica's state in one index's array; absent members are Missing."""
    return {r: members.get(r, MISSING) for r in range(replicas)}


@dataclass(frozen=True)
class ReplicaRecord:
    """What the Volume's status says of one replica."""

    index: int
    replica: int
    in_sync: bool
    state: str
    message: str = ""
    # md's event count of the in-sync members when the index's membership last changed,
    # and the number of such changes (0: recorded before either was kept).
    events: int = 0
    generation: int = 0

    @property
    def key(self) -> Key:
        return (self.index, self.replica)


def records_from_status(items: Iterable[Mapping[str, object]] | None) -> dict[Key, ReplicaRecord]:
    """The status's replica list (absent: nothing recorded, every replica in sync)."""
    out: dict[Key, ReplicaRecord] = {}
    for item in items or []:
        index, replica = int(str(item["index"])), int(str(item["replica"]))
        out[(index, replica)] = ReplicaRecord(
            index, replica, bool(item.get("inSync", True)), str(item.get("state") or IN_SYNC),
            str(item.get("message") or ""), int(str(item.get("events") or 0)),
            int(str(item.get("generation") or 0)),
        )  # fmt: skip
    return out


def in_sync(records: Mapping[Key, ReplicaRecord], key: Key) -> bool:
    """Replicas start in sync (created together, assumed clean); only a record says not."""
    found = records.get(key)
    return True if found is None else found.in_sync


class StageRefused(Exception):
    """NodeStage must not assemble: no in-sync replica of an index is reachable."""


@dataclass(frozen=True)
class StagePlan:
    assemble: dict[int, list[int]] = field(default_factory=dict)  # index -> replicas to use
    re_add: dict[int, list[int]] = field(default_factory=dict)  # index -> stale, reachable
    # Indexes whose array was never made: nothing recorded of them. Only these may be
    # created when no member holds an md superblock; for any other, members without one
    # are replacements or wiped, and a new array over them would be empty.
    creatable: frozenset[int] = frozenset()


def _why_behind(
    records: Mapping[Key, ReplicaRecord], key: Key, on_disk: Mapping[Key, int] | None
) -> str | None:
    """Why a reachable replica cannot be trusted to hold every write (None: it can)."""
    mine = [r for r in records.values() if r.index == key[0]]
    if not in_sync(records, key):
        return "out of sync"
    newest = max((r.generation for r in mine), default=0)
    if key in records and records[key].generation < newest:
        return f"recorded at generation {records[key].generation}, before {newest}"
    highest = max((r.events for r in mine), default=0)
    if on_disk is not None and on_disk.get(key, 0) < highest:
        return f"behind: md event count {on_disk.get(key, 0)}, {highest} recorded"
    return None


def plan_stage(
    stripe_width: int,
    replicas: int,
    records: Mapping[Key, ReplicaRecord],
    reachable: set[Key],
    nodes: Mapping[Key, str],
    on_disk: Mapping[Key, int] | None = None,
) -> StagePlan:
    """Which replicas each index's array is assembled from, and which are added back to
    resync; StageRefused names the index and why when none in sync can be reached.
    on_disk: each reachable member's own md event count (absent: no superblock)."""
    recorded = {key[0] for key in records}
    plan = StagePlan(creatable=frozenset(set(range(stripe_width)) - recorded))
    for index in range(stripe_width):
        keys = [(index, r) for r in range(replicas)]
        why_not = {k: _why_behind(records, k, on_disk) for k in keys if k in reachable}
        good = [k[1] for k, why in why_not.items() if why is None]
        if not good:
            why = "; ".join(
                f"replica {r} on {nodes.get((index, r), '?')} is "
                + (why_not.get((index, r)) or "unreachable")
                for _, r in keys
            )
            raise StageRefused(
                f"segment {index}: no replica that holds every acknowledged write can be "
                f"reached ({why}); bring the storage node of an in-sync replica back"
            )
        plan.assemble[index] = good
        plan.re_add[index] = [k[1] for k, why in why_not.items() if why is not None]
    return plan


def record(
    index: int, states: Mapping[int, str], previous: Mapping[Key, ReplicaRecord],
    sync_percent: float | None = None, events: int | None = None,
) -> dict[Key, ReplicaRecord]:  # fmt: skip
    """New records for one index from its array's member states. A replica comes back in
    sync only when md says so; a Recovering one shows how far the resync has come. When
    the in-sync members change, the generation is raised and `events` (the in-sync
    members' md event count now) recorded; otherwise both stay as they were, so md's
    count moving on with every write never rewrites the status."""
    out = _states(index, states, previous, sync_percent)
    before = {k: r for k, r in previous.items() if k[0] == index}
    generation = max((r.generation for r in before.values()), default=0)
    kept = max((r.events for r in before.values()), default=0)
    members = {k for k, r in out.items() if r.in_sync}
    if not before or members != {k for k, r in before.items() if r.in_sync}:
        generation += 1
        kept = events if events is not None else kept
    return {k: replace(r, events=kept, generation=generation) for k, r in out.items()}


def _states(
    index: int, states: Mapping[int, str], previous: Mapping[Key, ReplicaRecord],
    sync_percent: float | None,
) -> dict[Key, ReplicaRecord]:  # fmt: skip
    out: dict[Key, ReplicaRecord] = {}
    for replica, state in states.items():
        key = (index, replica)
        if state == IN_SYNC:
            out[key] = ReplicaRecord(index, replica, True, IN_SYNC)
        elif state == RECOVERING:
            done = f": {sync_percent:.0f}% resynced" if sync_percent is not None else ""
            out[key] = ReplicaRecord(index, replica, False, RECOVERING, f"resyncing{done}")
        else:
            was = previous.get(key)
            message = (
                "md failed it (its storage node or path is down); I/O goes on without it"
                if state == FAULTY
                else "not in the array; it is added back when its storage node is reachable"
            )
            if was is not None and not was.in_sync and was.state == state:
                message = was.message or message
            out[key] = ReplicaRecord(index, replica, False, state, message)
    return out


def condition(records: Mapping[Key, ReplicaRecord], nodes: Mapping[Key, str]) -> tuple[str, str]:
    """The Volume's ReplicasInSync condition: (status, message)."""
    behind = [r for r in sorted(records.values(), key=lambda r: r.key) if not r.in_sync]
    if not behind:
        return "True", "every replica holds every acknowledged write"
    parts = [
        f"segment {r.index} replica {r.replica} on {nodes.get(r.key, '?')}: {r.state}"
        + (f" ({r.message})" if r.message else "")
        for r in behind
    ]
    return "False", "; ".join(parts)


def to_status(records: Mapping[Key, ReplicaRecord]) -> list[dict[str, object]]:
    return [
        {"index": r.index, "replica": r.replica, "inSync": r.in_sync, "state": r.state,
         **({"message": r.message} if r.message else {}),
         **({"events": r.events} if r.events else {}),
         **({"generation": r.generation} if r.generation else {})}
        for r in sorted(records.values(), key=lambda r: r.key)
    ]  # fmt: skip


def sync_percent(sync_completed: str) -> float | None:
    """md's sync_completed ("done / total" sectors, or "none") as a percentage."""
    done, sep, total = sync_completed.partition("/")
    if not sep:
        return None
    try:
        d, t = int(done), int(total)
    except ValueError:
        return None
    return 100.0 * d / t if t else None
