"""What a block device holds, from blkid's low-level probe (`blkid -p -o export`, which
reads the device itself and needs no udev or cache).

Only blkid's "nothing found" (exit 2) means blank. A filesystem or other superblock
(TYPE), a partition table with no filesystem over the whole device (PTTYPE), several
signatures that contradict each other (exit 8, "ambivalent"), or tags with neither are all
"something": a caller that would format or pool the device refuses it and names what was
found. Any other exit is an error, never "blank". These are the rules of Kubernetes'
mount-utils (`getDiskFormat`), which never formats a device that has a partition table.
"""

from __future__ import annotations

from dataclasses import dataclass

from flashmesh.dataplane.process import CommandError, Runner

_NOTHING = 2
_AMBIVALENT = 8


class ProbeError(RuntimeError):
    """blkid could not say what the device holds."""


@dataclass(frozen=True)
class Signature:
    """Something blkid found on a device."""

    type: str | None = None  # TYPE: ext4, xfs, LVM2_member, linux_raid_member, ...
    partition_table: str | None = None  # PTTYPE: gpt, dos, ...
    ambivalent: bool = False  # several signatures that contradict each other

    @property
    def filesystem(self) -> str | None:
        """The filesystem to mount, when that is all the device holds."""
        if self.ambivalent or self.partition_table:
            return None
        return self.type

    def describe(self) -> str:
        if self.ambivalent:
            return "several conflicting signatures (blkid: ambivalent result)"
        if self.type and self.partition_table:
            return f"a {self.type} signature and a {self.partition_table} partition table"
        if self.partition_table:
            return f"a {self.partition_table} partition table"
        if self.type:
            return f"a {self.type} signature"
        return "data blkid recognises but cannot name"


def parse(text: str) -> Signature:
    """A Signature from `blkid -p -o export` output."""
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return Signature(type=fields.get("TYPE") or None, partition_table=fields.get("PTTYPE") or None)


def probe(runner: Runner, device: str) -> Signature | None:
    """What device holds; None only when blkid finds nothing at all."""
    result = runner(["blkid", "-p", "-o", "export", device])
    if result.rc == _NOTHING:
        return None
    if result.rc == _AMBIVALENT:
        return Signature(ambivalent=True)
    if result.rc != 0:
        raise ProbeError(f"cannot probe {device}: {CommandError(result)}")
    return parse(result.stdout)
