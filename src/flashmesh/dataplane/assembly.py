"""Device-mapper stripes over a volume's segments, derived from the volume alone: the
segment devices in index order, the segment size and the chunk size give the whole table,
so nothing is written on the disks and a restarted node plugin rebuilds the same device.

A single-segment volume needs no assembly: callers use the segment's /dev/nvmeXnY as it
is. A stripe grows by reloading a longer table (`dmsetup reload` + `dmsetup resume`) once
every segment device shows its new size; a change that would move data under a
filesystem (fewer sectors, another chunk size, another stripe count) is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flashmesh.dataplane import process
from flashmesh.dataplane.process import CommandError, Runner

DM_NAME_MAX = 127  # DM_NAME_LEN (128) with its terminating NUL
DM_PREFIX = "flashmesh-"
# Chunks are whole 4 KiB pages, so no filesystem block is split across two segments.
CHUNK_ALIGN = 8
_ABSENT = ("No such device or address", "Device does not exist")


class AssemblyError(RuntimeError):
    pass


@dataclass(frozen=True)
class StripedTable:
    """A one-target `striped` table; devices as given (paths) or as the kernel shows them
    (major:minor), each at offset 0."""

    length: int
    chunk: int
    devices: tuple[str, ...]

    def text(self) -> str:
        legs = " ".join(f"{device} 0" for device in self.devices)
        return f"0 {self.length} striped {len(self.devices)} {self.chunk} {legs}"


def dm_name(volume_id: str) -> str:
    """The device-mapper name of a volume's stripe: /dev/mapper/flashmesh-<volume id>."""
    name = DM_PREFIX + volume_id
    if len(name) > DM_NAME_MAX or not volume_id or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"{volume_id!r} cannot name a device-mapper device")
    return name


def stripe_length(stripes: int, segment_sectors: int, chunk_sectors: int) -> int:
    """Sectors of a stripe over `stripes` segments: dm wants a multiple of chunk x stripes,
    so each segment's tail short of a whole chunk is left unused."""
    if stripes < 1:
        raise ValueError("a stripe needs at least one device")
    if chunk_sectors < CHUNK_ALIGN or chunk_sectors % CHUNK_ALIGN:
        raise ValueError(f"chunk of {chunk_sectors} sectors is not a multiple of {CHUNK_ALIGN}")
    per_segment = segment_sectors - segment_sectors % chunk_sectors
    if per_segment <= 0:
        raise ValueError(f"segments of {segment_sectors} sectors hold no {chunk_sectors}-chunk")
    return per_segment * stripes


def striped(devices: Sequence[str], segment_sectors: int, chunk_sectors: int) -> StripedTable:
    if len(set(devices)) != len(devices):
        raise ValueError(f"a device appears twice in the stripe: {list(devices)}")
    length = stripe_length(len(devices), segment_sectors, chunk_sectors)
    return StripedTable(length, chunk_sectors, tuple(devices))


def striped_table(devices: list[str], segment_sectors: int, chunk_sectors: int) -> str:
    """`0 <total> striped <n> <chunk> <dev> 0 <dev> 0 ...`, devices in segment order."""
    return striped(devices, segment_sectors, chunk_sectors).text()


def parse_table(text: str) -> StripedTable | None:
    """The table `dmsetup table` prints, if it is one striped target from sector 0 with
    every leg at offset 0 (as FlashMesh makes them); None for anything else."""
    lines = text.strip().splitlines()
    if len(lines) != 1:
        return None
    words = lines[0].split()
    if len(words) < 5 or words[0] != "0" or words[2] != "striped":
        return None
    count = int(words[3])
    legs = words[5:]
    if len(legs) != 2 * count or any(offset != "0" for offset in legs[1::2]):
        return None
    return StripedTable(int(words[1]), int(words[4]), tuple(legs[0::2]))


def device_number(path: str) -> str:
    """major:minor of a block device node, as dmsetup's tables name devices."""
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def decide(name: str, current: StripedTable | None, wanted: StripedTable) -> str:
    """create, keep or reload (wanted's devices as major:minor, like current's); raises
    for a change that would move existing data."""
    if current is None:
        return "create"
    if len(current.devices) != len(wanted.devices) or current.chunk != wanted.chunk:
        raise AssemblyError(
            f"{name} stripes {len(current.devices)} x {current.chunk} sectors, the volume "
            f"{len(wanted.devices)} x {wanted.chunk}: reshaping would scramble its data; "
            f"remove it (dmsetup remove {name}) only if that is intended"
        )
    if wanted.length < current.length:
        raise AssemblyError(
            f"{name} would shrink from {current.length} to {wanted.length} sectors under its "
            "filesystem: volumes only grow, so a segment size is wrong"
        )
    return "keep" if current == wanted else "reload"


def _dmsetup(runner: Runner, *argv: str) -> process.Result:
    return runner(["dmsetup", *argv])


def current_table(runner: Runner, name: str) -> str | None:
    """The live table of a device-mapper device, or None when there is no such device."""
    result = _dmsetup(runner, "table", name)
    if result.rc == 0:
        return result.stdout.strip()
    if any(text in result.stderr + result.stdout for text in _ABSENT):
        return None
    raise AssemblyError(f"dmsetup table {name} failed: {result.stderr.strip()}")


def _suspended(runner: Runner, name: str) -> bool:
    out = _dmsetup(runner, "info", "--columns", "--noheadings", "-o", "suspended", name)
    return out.rc == 0 and out.stdout.strip() == "Suspended"


def _check(runner: Runner, argv: list[str], fix: str) -> None:
    try:
        process.check(runner, argv)
    except CommandError as exc:
        raise AssemblyError(f"{exc}; {fix}") from None


def ensure_striped(
    runner: Runner,
    name: str,
    devices: list[str],
    segment_sectors: int,
    chunk_sectors: int,
    number_of: Callable[[str], str] = device_number,
    reload: bool = False,
) -> str:
    """The stripe `name` over the segment devices (in segment order), made, or reloaded
    with a longer table after the segments grew or with other devices (a segment connected
    again); `reload` reloads an unchanged table too. Its /dev/mapper path. Every device must
    already hold segment_sectors (rescan after growing), or the kernel refuses the table."""
    table = striped(devices, segment_sectors, chunk_sectors)
    text = current_table(runner, name)
    current = None
    if text is not None:
        current = parse_table(text)
        if current is None:
            raise AssemblyError(f"{name} exists but is not a FlashMesh stripe: {text!r}")
    wanted = StripedTable(table.length, table.chunk, tuple(number_of(d) for d in devices))
    action = decide(name, current, wanted)
    if action == "keep" and reload:
        action = "reload"
    fix = f"every device must hold at least {segment_sectors} sectors"
    if action == "create":
        _check(runner, ["dmsetup", "create", name, "--table", table.text()], fix)
    elif action == "reload":
        _check(runner, ["dmsetup", "reload", name, "--table", table.text()], fix)
        _check(runner, ["dmsetup", "resume", name], "resume it by hand")
    elif _suspended(runner, name):
        # Left suspended by a reload that was cut short: its I/O waits until resumed.
        _check(runner, ["dmsetup", "resume", name], "resume it by hand")
    return f"/dev/mapper/{name}"


def remove(runner: Runner, name: str) -> bool:
    """Removes the device; False when it was not there. It must be unmounted first."""
    if current_table(runner, name) is None:
        return False
    _check(runner, ["dmsetup", "remove", name], "unmount it and close what holds it open")
    return True
