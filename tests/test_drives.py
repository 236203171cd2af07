from __future__ import annotations

from pathlib import Path

from flashmesh.core.drives import BlockDevice, select_drives
from flashmesh.core.resources import DriveSelector
from flashmesh.dataplane.inventory import stable_names

GI = 1 << 30
PATTERNS = ["/dev/nvme*n1"]
VG = "flashmesh-fast"


def drive(name: str, size: int = 100 * GI, **kw: object) -> BlockDevice:
    return BlockDevice(f"/dev/{name}", size, **kw)  # type: ignore[arg-type]


def test_clean_matching_drives_of_the_minimum_size_join() -> None:
    devices = [drive("nvme0n1"), drive("nvme1n1"), drive("sda"), drive("nvme2n1", 10 * GI)]
    chosen = select_drives(devices, PATTERNS, 50 * GI, VG)
    assert [d.path for d in chosen.selected] == ["/dev/nvme0n1", "/dev/nvme1n1"]
    assert [d.path for d in chosen.too_small] == ["/dev/nvme2n1"]
    assert chosen.refused == () and chosen.problem(PATTERNS, 50 * GI) is None


def test_drives_already_in_the_pools_volume_group_stay_selected() -> None:
    devices = [drive("nvme0n1", fstype="LVM2_member", volume_group=VG)]
    assert select_drives(devices, PATTERNS, GI, VG).selected == tuple(devices)


def test_drives_holding_something_are_refused_with_the_fix() -> None:
    devices = [
        drive("nvme0n1", fstype="ext4"),
        drive("nvme1n1", partitioned=True),
        drive("nvme2n1", mounted=True, fstype="xfs"),
        drive("nvme3n1", fstype="LVM2_member", volume_group="other"),
    ]
    chosen = select_drives(devices, PATTERNS, GI, VG)
    assert chosen.selected == ()
    reasons = {r.path: r.reason for r in chosen.refused}
    assert (
        reasons["/dev/nvme0n1"]
        == "holds a ext4 signature: wipe it (wipefs -a) or exclude it by path"
    )
    assert "partition table" in reasons["/dev/nvme1n1"]
    assert "is mounted" in reasons["/dev/nvme2n1"]
    assert "volume group other" in reasons["/dev/nvme3n1"]
    reason, message = chosen.problem(PATTERNS, GI)  # type: ignore[misc]
    assert reason == "DriveInUse" and "/dev/nvme0n1 holds a ext4 signature" in message


def test_a_selection_that_matches_nothing_says_so() -> None:
    chosen = select_drives([drive("sda"), drive("nvme0n1", GI // 2)], PATTERNS, GI, VG)
    reason, message = chosen.problem(PATTERNS, GI)  # type: ignore[misc]
    assert reason == "NoDriveMatches"
    assert "pathPatterns ['/dev/nvme*n1'] with at least 1Gi (1 smaller than it)" in message
    assert message.endswith("change the patterns or minSize")


def test_the_default_pattern_takes_drives_by_udevs_stable_names() -> None:
    default = DriveSelector().path_patterns
    assert default == ["/dev/disk/by-id/nvme-*"]
    named = drive("nvme1n1", stable_names=("/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_fm-s0-d1",
                                           "/dev/disk/by-id/nvme-eui.0001"))  # fmt: skip
    unnamed = drive("nvme0n1")  # no udev link: not taken by a by-id pattern
    remote = drive("nvme2n1", stable_names=("/dev/disk/by-id/nvme-eui.0002",),
                   remote="is an NVMe-oF namespace (tcp, subsystem nqn.x)")  # fmt: skip
    chosen = select_drives([unnamed, named, remote], default, GI, VG)
    assert [d.path for d in chosen.selected] == ["/dev/nvme1n1"]
    assert [r.path for r in chosen.refused] == ["/dev/nvme2n1"]
    # A stable name picks one drive where kernel names would follow boot order.
    one = select_drives([unnamed, named], ["/dev/disk/by-id/*fm-s0-d1"], GI, VG)
    assert [d.path for d in one.selected] == ["/dev/nvme1n1"]
    none = select_drives([unnamed], default, GI, VG)
    assert "(/dev/disk/by-id names need udev on the node)" in none.problem(default, GI)[1]  # type: ignore[index]


def test_stable_names_are_read_from_udevs_links(tmp_path: Path) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    disk = tmp_path / "nvme1n1"
    disk.touch()
    for name in ("nvme-eui.01", "nvme-QEMU_NVMe_Ctrl_s1"):
        (by_id / name).symlink_to(disk)
    assert stable_names(by_id) == {
        str(disk): (str(by_id / "nvme-QEMU_NVMe_Ctrl_s1"), str(by_id / "nvme-eui.01"))
    }
    assert stable_names(tmp_path / "no-udev") == {}
