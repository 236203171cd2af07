"""Which of a node's drives a StoragePool takes: a pure decision over the node's inventory.

A drive joins when its path, or one of udev's stable names for it (/dev/disk/by-id),
matches one of the pool's patterns and it is at least the pool's minimum size. One that
matches but holds something (a filesystem, a partition table, a mount, another volume
group) is refused and never touched, and the refusal says why and what to do, for the
StorageNode's condition and Event.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from flashmesh.core.units import format_bytes

BY_ID = "/dev/disk/by-id/"


@dataclass(frozen=True)
class BlockDevice:
    path: str
    size: int
    model: str | None = None
    serial: str | None = None
    fstype: str | None = None  # what the whole device holds, as blkid names it
    partitioned: bool = False
    mounted: bool = False
    volume_group: str | None = None  # set when it is an LVM physical volume
    # Set when the probe could not say what the device holds, or found signatures that
    # contradict each other: why it is not known to be empty.
    unknown: str | None = None
    # Set when it is not a local drive (an NVMe-oF namespace, a FlashMesh volume): why.
    remote: str | None = None
    # udev's stable names for it (/dev/disk/by-id links); none where no udev runs.
    stable_names: tuple[str, ...] = ()

    def matches(self, patterns: list[str]) -> bool:
        names = (self.path, *self.stable_names)
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


@dataclass(frozen=True)
class Refusal:
    path: str
    reason: str


@dataclass(frozen=True)
class Selection:
    selected: tuple[BlockDevice, ...]
    refused: tuple[Refusal, ...]
    too_small: tuple[BlockDevice, ...]

    def problem(self, patterns: list[str], min_size: int) -> tuple[str, str] | None:
        """(reason, message) for a condition when the selection is not clean."""
        if self.refused:
            listed = "; ".join(f"{r.path} {r.reason}" for r in self.refused)
            return "DriveInUse", f"drives left untouched: {listed}"
        if not self.selected:
            smaller = f" ({len(self.too_small)} smaller than it)" if self.too_small else ""
            return (
                "NoDriveMatches",
                f"no drive matches spec.drives.pathPatterns {patterns} with at least "
                f"{format_bytes(min_size)}{smaller}: change the patterns or minSize"
                + (
                    " (/dev/disk/by-id names need udev on the node)"
                    if any(p.startswith(BY_ID) for p in patterns)
                    else ""
                ),
            )
        return None


def select_drives(
    devices: list[BlockDevice], patterns: list[str], min_size: int, volume_group: str
) -> Selection:
    selected: list[BlockDevice] = []
    refused: list[Refusal] = []
    too_small: list[BlockDevice] = []
    for dev in sorted(devices, key=lambda d: d.path):
        if not dev.matches(patterns):
            continue
        if dev.volume_group == volume_group:
            selected.append(dev)  # already ours: a restart finds what it made
            continue
        reason = _in_use(dev)
        if reason:
            refused.append(Refusal(dev.path, reason))
        elif dev.size < min_size:
            too_small.append(dev)
        else:
            selected.append(dev)
    return Selection(tuple(selected), tuple(refused), tuple(too_small))


def _in_use(dev: BlockDevice) -> str | None:
    if dev.remote:
        return f"{dev.remote}: only local drives are pooled; exclude it by path"
    if dev.volume_group:
        return f"belongs to volume group {dev.volume_group}: exclude it by path"
    if dev.mounted:
        return "is mounted: unmount it or exclude it by path"
    if dev.partitioned:
        return "holds a partition table: wipe it (wipefs -a) or exclude it by path"
    if dev.fstype:
        return f"holds a {dev.fstype} signature: wipe it (wipefs -a) or exclude it by path"
    if dev.unknown:
        return f"{dev.unknown}: wipe it (wipefs -a) or exclude it by path"
    return None
