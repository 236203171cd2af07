"""Mirrored volumes' decisions: which replicas NodeStage may assemble, how md's member
states become the Volume's replica records and its ReplicasInSync condition."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import pytest

from flashmesh.core import mirrors
from flashmesh.core.mirrors import FAULTY, IN_SYNC, MISSING, RECOVERING, ReplicaRecord
from flashmesh.dataplane import mirror
from flashmesh.dataplane.process import Result, Runner

NODES = {(0, 0): "storage-0", (0, 1): "storage-1", (1, 0): "storage-2", (1, 1): "storage-3"}


def behind(*keys: tuple[int, int]) -> dict[tuple[int, int], ReplicaRecord]:
    return {k: ReplicaRecord(k[0], k[1], False, FAULTY) for k in keys}


def test_a_mirror_segment_carries_md_metadata_on_top_of_its_share() -> None:
    assert mirrors.segment_bytes(64 << 20, 1, 1) == 64 << 20
    assert mirrors.segment_bytes(64 << 20, 2, 2) == (32 << 20) + mirrors.DATA_OFFSET
    assert mirrors.md_name("fm-0123456789ab", 3) == "fm-0123456789ab-s3"
    with pytest.raises(ValueError, match="longer than 32"):
        mirrors.md_name("x" * 40, 0)


@pytest.mark.parametrize(
    ("flags", "state"),
    [("in_sync", IN_SYNC), ("in_sync,write_error", IN_SYNC), ("faulty", FAULTY),
     ("faulty,in_sync", FAULTY), ("spare", RECOVERING), ("", RECOVERING)],
)  # fmt: skip
def test_member_states_from_mds_flags(flags: str, state: str) -> None:
    assert mirrors.member_state(flags) == state


def test_every_replica_reachable_and_in_sync_is_assembled() -> None:
    everything = set(NODES)
    plan = mirrors.plan_stage(2, 2, {}, everything, NODES)
    assert plan.assemble == {0: [0, 1], 1: [0, 1]}
    assert plan.re_add == {0: [], 1: []}


def test_a_replica_behind_is_added_back_not_assembled() -> None:
    plan = mirrors.plan_stage(1, 2, behind((0, 1)), {(0, 0), (0, 1)}, NODES)
    assert plan.assemble == {0: [0]} and plan.re_add == {0: [1]}


def test_an_unreachable_replica_leaves_the_mirror_degraded_but_staged() -> None:
    plan = mirrors.plan_stage(1, 2, {}, {(0, 1)}, NODES)
    assert plan.assemble == {0: [1]} and plan.re_add == {0: []}


def test_only_a_stale_replica_reachable_is_refused_not_rolled_back() -> None:
    with pytest.raises(mirrors.StageRefused) as refused:
        mirrors.plan_stage(1, 2, behind((0, 1)), {(0, 1)}, NODES)
    message = str(refused.value)
    assert "segment 0" in message
    assert "replica 0 on storage-0 is unreachable" in message
    assert "replica 1 on storage-1 is out of sync" in message
    assert "bring the storage node of an in-sync replica back" in message


def test_records_follow_md_and_keep_their_first_message() -> None:
    states = {0: IN_SYNC, 1: FAULTY}
    first = mirrors.record(0, states, {})
    assert first[(0, 0)].in_sync and not first[(0, 1)].in_sync
    assert "I/O goes on without it" in first[(0, 1)].message
    assert mirrors.record(0, states, first) == first  # unchanged: nothing to write
    resync = mirrors.record(0, {0: IN_SYNC, 1: RECOVERING}, first, 42.0)
    assert resync[(0, 1)] == ReplicaRecord(
        0, 1, False, RECOVERING, "resyncing: 42% resynced", generation=1
    )
    back = mirrors.record(0, {0: IN_SYNC, 1: IN_SYNC}, resync)
    assert all(r.in_sync for r in back.values())


def test_a_membership_change_raises_the_generation_and_records_mds_event_count() -> None:
    both = mirrors.record(0, {0: IN_SYNC, 1: IN_SYNC}, {}, events=10)
    assert {(r.events, r.generation) for r in both.values()} == {(10, 1)}
    # md's count moves on with every superblock write: that alone rewrites nothing.
    assert mirrors.record(0, {0: IN_SYNC, 1: IN_SYNC}, both, events=57) == both
    degraded = mirrors.record(0, {0: IN_SYNC, 1: FAULTY}, both, events=60)
    assert {(r.events, r.generation) for r in degraded.values()} == {(60, 2)}
    assert (
        mirrors.record(0, {0: IN_SYNC, 1: RECOVERING}, degraded, 5.0, events=61)[(0, 1)].generation
        == 2
    )  # still the same in-sync members
    healed = mirrors.record(0, {0: IN_SYNC, 1: IN_SYNC}, degraded, events=70)
    assert {(r.events, r.generation) for r in healed.values()} == {(70, 3)}
    assert mirrors.records_from_status(mirrors.to_status(healed)) == healed


def test_a_member_whose_own_event_count_is_behind_the_record_is_not_assembled() -> None:
    # Both recorded in sync (a record written before md's failure reached it), but
    # replica 1's superblock is at a count below the one recorded: it missed writes.
    records = mirrors.record(0, {0: IN_SYNC, 1: IN_SYNC}, {}, events=60)
    plan = mirrors.plan_stage(1, 2, records, {(0, 0), (0, 1)}, NODES, {(0, 0): 64, (0, 1): 58})
    assert plan.assemble == {0: [0]} and plan.re_add == {0: [1]}
    with pytest.raises(mirrors.StageRefused) as refused:
        mirrors.plan_stage(1, 2, records, {(0, 1)}, NODES, {(0, 1): 58})
    assert "replica 1 on storage-1 is behind: md event count 58, 60 recorded" in str(refused.value)
    # A member with no superblock at all is not a member that holds the data.
    with pytest.raises(mirrors.StageRefused, match="event count 0, 60 recorded"):
        mirrors.plan_stage(1, 2, records, {(0, 1)}, NODES, {})


def test_a_member_recorded_at_an_older_generation_is_not_assembled() -> None:
    records = {
        (0, 0): ReplicaRecord(0, 0, True, IN_SYNC, generation=4),
        (0, 1): ReplicaRecord(0, 1, True, IN_SYNC, generation=3),
    }
    with pytest.raises(mirrors.StageRefused, match="generation 3, before 4"):
        mirrors.plan_stage(1, 2, records, {(0, 1)}, NODES)


def test_records_from_before_event_counts_still_stage() -> None:
    records = {(0, r): ReplicaRecord(0, r, True, IN_SYNC) for r in (0, 1)}
    plan = mirrors.plan_stage(1, 2, records, {(0, 0), (0, 1)}, NODES, {(0, 0): 9})
    assert plan.assemble == {0: [0, 1]}


def test_mds_event_count_is_read_from_the_members_own_superblock(tmp_path: Path) -> None:
    member = tmp_path / "member"
    block = bytearray(8192)
    struct.pack_into("<II", block, 4096, mirror.MD_MAGIC, 1)
    struct.pack_into("<Q", block, 4096 + mirror.EVENTS_AT, 1234)
    member.write_bytes(bytes(block))
    assert mirror.events(str(member)) == 1234
    blank = tmp_path / "blank"
    blank.write_bytes(bytes(8192))
    assert mirror.events(str(blank)) is None
    with pytest.raises(mirror.MirrorError, match="reading the md superblock"):
        mirror.events(str(tmp_path / "gone"))


def test_the_monitor_wakes_on_every_attribute_md_notifies(tmp_path: Path) -> None:
    md = tmp_path / "md127" / "md"
    for dev in ("dev-nvme1n1", "dev-nvme2n1"):
        (md / dev).mkdir(parents=True)
    (tmp_path / "dev" / "md").mkdir(parents=True)
    link = tmp_path / "dev" / "md" / "fm-1-s0"
    link.symlink_to(tmp_path / "md127")
    with mock.patch.object(mirror, "DEV_MD", tmp_path / "dev" / "md"):
        files = mirror.watched_files(["fm-1-s0", "fm-gone-s0"], tmp_path)
    assert files == [md / "degraded", md / "sync_action", md / "dev-nvme1n1" / "state",
                     md / "dev-nvme2n1" / "state"]  # fmt: skip


def test_missing_members_count_as_behind() -> None:
    states = mirrors.index_states({0: IN_SYNC}, 2)
    assert states == {0: IN_SYNC, 1: MISSING}
    assert not mirrors.record(0, states, {})[(0, 1)].in_sync


def test_status_round_trip_and_condition() -> None:
    records = mirrors.record(0, {0: IN_SYNC, 1: FAULTY}, {})
    assert mirrors.records_from_status(mirrors.to_status(records)) == records
    status, message = mirrors.condition(records, NODES)
    assert status == "False"
    assert message.startswith("segment 0 replica 1 on storage-1: Faulty")
    assert mirrors.condition(mirrors.record(0, {0: IN_SYNC, 1: IN_SYNC}, {}), NODES)[0] == "True"
    assert mirrors.in_sync({}, (0, 1))  # nothing recorded: created in sync


@pytest.mark.parametrize(
    ("text", "percent"), [("none", None), ("512 / 2048", 25.0), ("x / y", None), ("0 / 0", None)]
)
def test_sync_progress(text: str, percent: float | None) -> None:
    assert mirrors.sync_percent(text) == percent


# --- the mdadm and sysfs adapter ---------------------------------------------------------


def examined(rc: int, stderr: str) -> Runner:
    def run(argv: Sequence[str], *, secrets: Sequence[str] = ()) -> Result:
        return Result(tuple(argv), rc, "", stderr)

    return run


def test_only_a_device_mdadm_calls_blank_is_blank() -> None:
    # An array is created only over members mdadm reads as blank: an I/O error is not that.
    assert mirror.has_superblock(examined(0, ""), "/dev/nvme1n1")
    blank = examined(1, "mdadm: No md superblock detected on /dev/nvme1n1.\n")
    assert not mirror.has_superblock(blank, "/dev/nvme1n1")
    with pytest.raises(mirror.MirrorError, match="Input/output error"):
        mirror.has_superblock(examined(1, "mdadm: cannot open: Input/output error"), "/dev/x")


def test_a_link_left_to_a_stopped_array_is_not_an_array(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without udev mdadm leaves /dev/md/<name> behind; the kernel reuses mdNNN later.
    dev, sys_block = tmp_path / "dev", tmp_path / "sys"
    (dev / "md").mkdir(parents=True)
    (dev / "md127").touch()
    (dev / "md" / "fm-1-s0").symlink_to("../md127")
    monkeypatch.setattr(mirror, "DEV_MD", dev / "md")
    assert mirror.kernel_name("fm-1-s0", sys_block) is None  # md127 is not running
    (sys_block / "md127" / "md").mkdir(parents=True)
    assert mirror.kernel_name("fm-1-s0", sys_block) == "md127"
    mirror.forget("fm-1-s0")
    assert not (dev / "md" / "fm-1-s0").is_symlink()
    assert mirror.kernel_name("fm-1-s0", sys_block) is None


def test_only_a_mirror_never_recorded_may_be_created() -> None:
    """The first stage records every replica; from then on an index whose reachable
    members hold no md superblock (a replacement LV, a wiped one) is never created again
    over them, which would make an empty array and then resync the good replica from it."""
    reachable = {(0, 0), (0, 1), (1, 0), (1, 1)}
    fresh = mirrors.plan_stage(2, 2, {}, reachable, NODES)
    assert fresh.creatable == {0, 1}
    made = {(0, r): mirrors.ReplicaRecord(0, r, True, mirrors.IN_SYNC) for r in (0, 1)}
    again = mirrors.plan_stage(2, 2, made, reachable, NODES)
    assert again.creatable == {1}


def test_a_stop_that_meets_udevs_probe_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """udev opens an array to probe it when a writer closes it: mdadm --stop then says the
    device is busy for a moment (seen in the lab: NodeUnstage failed INTERNAL)."""
    answers = [1, 1, 0]
    ran: list[list[str]] = []

    def runner(argv: Sequence[str]) -> Result:
        ran.append(list(argv))
        rc = answers.pop(0)
        return Result(tuple(argv), rc, "", "mdadm: failed to stop array: Device or resource busy")

    monkeypatch.setattr(mirror, "kernel_name", lambda name: "md127" if answers else None)
    monkeypatch.setattr(mirror, "STOP_PAUSE", 0)
    monkeypatch.setattr(mirror, "forget", lambda name: None)
    mirror.stop(runner, "fm-1-s0")
    assert len(ran) == 3
    other: Runner = lambda argv: Result(tuple(argv), 1, "", "mdadm: no such array")  # noqa: E731
    monkeypatch.setattr(mirror, "kernel_name", lambda name: "md127")
    with pytest.raises(mirror.MirrorError, match="no such array"):
        mirror.stop(other, "fm-1-s0")
