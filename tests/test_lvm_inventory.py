"""LVM and drive inventory over recorded output (taken from lvm2 and lsblk in a lab VM) and
a runner that records the commands it is asked to run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from flashmesh.core.drives import select_drives
from flashmesh.dataplane import lvm, signatures
from flashmesh.dataplane.inventory import inventory, parse_lsblk
from flashmesh.dataplane.process import Result

DATA = Path(__file__).parent / "data"
VG = "flashmesh-fast"


class Recorder:
    """Answers lvm2's report commands from recorded output; records every command."""

    def __init__(self, **answers: str) -> None:
        self.answers = answers
        self.argv: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> Result:
        self.argv.append(tuple(argv))
        out = self.answers.get(argv[0], "")
        if argv[0] == "blkid":
            out = self.answers.get(f"blkid {argv[-1]}", "")
            if out.startswith("exit "):  # blkid failing: "exit <code>: <stderr>"
                rc, err = out[5:].split(": ", 1)
                return Result(tuple(argv), int(rc), "", err)
            return Result(tuple(argv), 0 if out else 2, out, "")
        return Result(tuple(argv), 0, out, "")

    def changes(self) -> list[str]:
        readers = {"pvs", "vgs", "lvs", "lsblk", "blkid"}
        return [" ".join(a) for a in self.argv if a[0] not in readers]


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def lvm_with_state() -> tuple[lvm.Lvm, Recorder]:
    rec = Recorder(pvs=recorded("pvs.json"), vgs=recorded("vgs.json"), lvs=recorded("lvs.json"))
    return lvm.Lvm(rec), rec


def test_reports_parse_into_volumes_without_lvm2s_hidden_ones() -> None:
    lvs = lvm.logical_volumes(recorded("lvs.json"))
    assert [lv.name for lv in lvs] == ["fm-000000000001-s0r0", "fs-000000000009-s0r0", "thin"]
    pool = lvs[2]
    assert (pool.segtype, pool.data_percent, pool.metadata_percent) == ("thin-pool", 8.0, 10.94)
    snap = lvs[1]
    assert snap.origin == "fm-000000000001-s0r0" and snap.active
    assert snap.device == "/dev/mapper/flashmesh--fast-fs--000000000009--s0r0"
    (group,) = lvm.volume_groups(recorded("vgs.json"))
    assert (group.size, group.free) == (130023424, 16777216)


def test_existing_volumes_are_left_as_they_are() -> None:
    tool, rec = lvm_with_state()
    tool.ensure_volume_group(VG, ["/dev/nvme1n1"])
    tool.ensure_thin_pool(VG)
    tool.ensure_volume(VG, "fm-000000000001-s0r0", 64 << 20)
    tool.ensure_snapshot(VG, "fm-000000000001-s0r0", "fs-000000000009-s0r0")
    assert rec.changes() == []  # all there and active: nothing to do


def test_inactive_volumes_are_activated_after_a_reboot() -> None:
    tool, rec = lvm_with_state()
    rec.answers["lvs"] = rec.answers["lvs"].replace('"Vwi-a-tz--"', '"Vwi---tz--"')
    tool.ensure_volume_group(VG, ["/dev/nvme1n1"])
    assert rec.changes() == [f"vgchange --activate y {VG}"]


def test_reports_are_read_once_until_something_changes() -> None:
    tool, rec = lvm_with_state()
    for _ in range(3):
        tool.logical_volume(VG, "fm-000000000001-s0r0")
    assert [a[0] for a in rec.argv] == ["lvs"]  # the group's size comes with its volumes
    assert tool.volume_group(VG) is not None and [a[0] for a in rec.argv] == ["lvs"]
    tool.remove_volume(VG, "fm-000000000001-s0r0")
    tool.logical_volumes(VG)
    assert [a[0] for a in rec.argv] == ["lvs", "lvremove", "lvs"]


def test_a_volume_grows_but_never_shrinks() -> None:
    tool, rec = lvm_with_state()
    tool.ensure_volume(VG, "fm-000000000001-s0r0", 128 << 20)
    tool.ensure_volume(VG, "fm-000000000001-s0r0", 32 << 20)
    assert rec.changes() == [f"lvextend --yes --size {128 << 20}b {VG}/fm-000000000001-s0r0"]


def test_new_volumes_are_thin_and_snapshots_activate() -> None:
    tool, rec = lvm_with_state()
    with pytest.raises(lvm.LvmError, match="missing after creation"):
        tool.ensure_volume(VG, "fm-000000000002-s0r0", 1 << 30)  # the recording never changes
    with pytest.raises(lvm.LvmError, match="missing after creation"):
        tool.ensure_snapshot(VG, "fm-000000000001-s0r0", "fs-00000000000a-s0r0")
    assert rec.changes() == [
        f"lvcreate --yes --thin --virtualsize {1 << 30}b --name fm-000000000002-s0r0 {VG}/thin",
        f"lvcreate --yes --snapshot --setactivationskip n --name fs-00000000000a-s0r0 "
        f"{VG}/fm-000000000001-s0r0",
    ]


def test_a_new_volume_group_gets_its_drives_and_a_zeroing_thin_pool() -> None:
    rec = Recorder(pvs='{"report":[{"pv":[]}]}', vgs='{"report":[{"vg":[]}]}')
    tool = lvm.Lvm(rec)
    tool.ensure_volume_group("flashmesh-slow", ["/dev/nvme0n1", "/dev/nvme2n1"])
    with pytest.raises(lvm.LvmError):
        tool.ensure_thin_pool("flashmesh-slow")
    assert rec.changes() == [
        "vgcreate --setautoactivation n flashmesh-slow /dev/nvme0n1 /dev/nvme2n1",
        "lvcreate --yes --type thin-pool --zero y --extents 95%FREE --name thin flashmesh-slow",
    ]


def test_removal_is_idempotent_and_allocation_counts_promises() -> None:
    tool, rec = lvm_with_state()
    assert tool.remove_volume(VG, "fm-000000000001-s0r0") is True
    assert tool.remove_volume(VG, "fm-00000000dead-s0r0") is False
    assert rec.changes() == [f"lvremove --yes {VG}/fm-000000000001-s0r0"]
    assert tool.allocated(VG) == 2 * (64 << 20)


def test_the_inventory_sees_whole_disks_their_signatures_and_volume_groups(
    tmp_path: Path,
) -> None:
    disks = parse_lsblk(recorded("lsblk.json"))
    assert [d["path"] for d in disks] == ["/dev/nvme0n1", "/dev/nvme2n1", "/dev/nvme1n1"]
    assert disks[0]["model"] == "QEMU NVMe Ctrl" and disks[0]["serial"] == "fm52ec18f6n1"
    assert signatures.parse("DEVNAME=/dev/x\nTYPE=ext4\n") == signatures.Signature(type="ext4")
    assert signatures.parse("PTUUID=1\nPTTYPE=gpt\n").partition_table == "gpt"

    rec = Recorder(
        lsblk=recorded("lsblk.json"),
        pvs=recorded("pvs.json"),
        **{"blkid /dev/nvme0n1": "TYPE=ext4\n", "blkid /dev/nvme1n1": "TYPE=LVM2_member\n"},
    )
    found = {d.path: d for d in inventory(rec, tmp_path)}
    assert found["/dev/nvme0n1"].fstype == "ext4"
    assert found["/dev/nvme1n1"].volume_group == VG
    assert found["/dev/nvme2n1"].fstype is None and found["/dev/nvme2n1"].size == 64 << 20
    assert rec.changes() == []  # looking changes nothing


def test_a_drive_blkid_cannot_vouch_for_is_refused_and_untouched(tmp_path: Path) -> None:
    """Only blkid's "nothing found" (exit 2) is blank: conflicting leftover signatures
    (exit 8) or a probe that fails are refused, where exit 8 used to read as blank."""
    rec = Recorder(
        lsblk=recorded("lsblk.json"),
        pvs=recorded("pvs.json"),
        **{
            "blkid /dev/nvme0n1": "exit 8: ambivalent result (probably more filesystems)",
            "blkid /dev/nvme2n1": "exit 4: cannot open /dev/nvme2n1",
        },
    )
    found = {d.path: d for d in inventory(rec, tmp_path)}
    selection = select_drives(list(found.values()), ["/dev/nvme*"], 1, "other-vg")
    refused = {r.path: r.reason for r in selection.refused}
    assert refused["/dev/nvme0n1"] == (
        "holds several conflicting signatures (blkid: ambivalent result): "
        "wipe it (wipefs -a) or exclude it by path"
    )
    assert refused["/dev/nvme2n1"].startswith("could not be probed (cannot probe /dev/nvme2n1")
    assert "/dev/nvme0n1" not in [d.path for d in selection.selected]
    assert rec.changes() == []


def nvme_subsystem(root: Path, number: int, nqn: str, transport: str) -> None:
    """A subsystem as Debian's 6.12 kernel lays it out in sysfs: its NQN, one controller
    (a link to /sys/class/nvme/nvmeN in the kernel; a folder here) and a multipath head."""
    subsystem = root / "class" / "nvme-subsystem" / f"nvme-subsys{number}"
    controller = subsystem / f"nvme{number}"
    head = subsystem / f"nvme{number}n1"
    for folder in (controller, head):
        folder.mkdir(parents=True)
    (subsystem / "subsysnqn").write_text(nqn + "\n")
    for name, value in {"state": "live", "transport": transport, "address": "x"}.items():
        (controller / name).write_text(value + "\n")
    (head / "nsid").write_text("1\n")


def test_a_namespace_reached_over_a_fabric_or_of_flashmesh_is_never_pooled(
    tmp_path: Path,
) -> None:
    """A storage node that is also a GPU node has FlashMesh volumes connected: their
    namespaces look like blank NVMe drives to lsblk and blkid, and were pooled (vgextend)."""
    nvme_subsystem(tmp_path, 0, "nqn.2019-08.org.qemu:fm52ec18f6", "pcie")  # a local drive
    nvme_subsystem(tmp_path, 1, "nqn.2026-11.dev.flashmesh:fm-0123456789ab.s0r0", "tcp")
    # (whatever its transport says: FlashMesh exports volumes, never drives)
    nvme_subsystem(tmp_path, 2, "nqn.2026-11.dev.flashmesh:fm-0123456789ab.s1r0", "pcie")
    nvme_subsystem(tmp_path, 3, "nqn.2014-08.org.example:array", "rdma")
    rec = Recorder(lsblk=recorded("lsblk.json"), pvs=recorded("pvs.json"))
    found = {d.path: d for d in inventory(rec, tmp_path)}
    assert found["/dev/nvme0n1"].remote is None
    assert found["/dev/nvme1n1"].remote == (
        "is an NVMe-oF namespace (tcp, subsystem nqn.2026-11.dev.flashmesh:fm-0123456789ab.s0r0)"
    )
    assert found["/dev/nvme2n1"].remote == (
        "is a namespace of FlashMesh subsystem nqn.2026-11.dev.flashmesh:fm-0123456789ab.s1r0"
    )
    selection = select_drives(list(found.values()), ["/dev/nvme*"], 1, "other-vg")
    refused = {r.path: r.reason for r in selection.refused}
    assert [d.path for d in selection.selected] == ["/dev/nvme0n1"]
    assert refused["/dev/nvme1n1"].endswith(": only local drives are pooled; exclude it by path")
    assert set(refused) == {"/dev/nvme1n1", "/dev/nvme2n1"}
    assert rec.changes() == []


def test_an_event_pass_keeps_the_reports_of_the_pass_before() -> None:
    """A publish or unpublish (an event pass) runs no lvm2 command: the agent is its volume
    group's only writer. Its own change, a resync, a retry and a failed pass read afresh."""
    from flashmesh.dataplane.agent.loop import Agent

    rec = Recorder(lvs=recorded("lvs.json"))
    agent = Agent(kube=None, node="storage-0", address="10.0.0.1", runner=rec)  # type: ignore[arg-type]

    def lvs_after(trigger: str) -> int:
        agent._trigger = trigger
        agent._pass_lvm().volume_group(VG)
        return sum(1 for a in rec.argv if a[0] == "lvs")

    assert lvs_after("start") == 1
    assert lvs_after("event") == 1
    assert lvs_after("event") == 1
    assert agent._pass_lvm().remove_volume(VG, "fm-000000000001-s0r0")
    assert lvs_after("event") == 2  # its own change dropped the reports
    assert lvs_after("resync") == 3
    assert lvs_after("retry") == 4
    assert lvs_after("single") == 5  # reconcile() called by itself never keeps them
