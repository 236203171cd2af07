from __future__ import annotations

from flashmesh.core.drives import BlockDevice, select_drives

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
