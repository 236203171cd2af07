"""md RAID1 arrays over a mirrored volume's replica segments, through mdadm and sysfs.

Arrays are named (/dev/md/<volume id>-s<index>) and always assembled from an explicit
device list, never by scanning, so a node never picks up another volume's members. The
host's udev assembles none of them on its own (FlashMesh's rule in dataplane/udev.py), and
the names hold with or without udev (mdadm makes /dev/md/ links itself). The decisions
(which members, when a replica counts as in sync) are in flashmesh.core.mirrors."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flashmesh.core import mirrors
from flashmesh.dataplane import process
from flashmesh.dataplane.process import CommandError, Runner

SYS_BLOCK = Path("/sys/block")
DEV_MD = Path("/dev/md")


class MirrorError(RuntimeError):
    pass


def md_path(name: str) -> str:
    return str(DEV_MD / name)


def kernel_name(name: str, root: Path = SYS_BLOCK) -> str | None:
    """mdNNN behind /dev/md/<name>, or None when the array is not assembled (a link left
    to an array that is gone does not count)."""
    try:
        if not (DEV_MD / name).exists():
            return None
        md = Path(os.path.realpath(md_path(name))).name
    except OSError:
        return None
    return md if (root / md / "md").is_dir() else None


def forget(name: str) -> None:
    """Removes the /dev/md/<name> link. Where no udev runs, mdadm leaves it behind when it
    stops an array, and the kernel hands the same mdNNN to the next array made."""
    with contextlib.suppress(OSError):
        (DEV_MD / name).unlink(missing_ok=True)


def _mdadm(runner: Runner, argv: Sequence[str], what: str) -> process.Result:
    try:
        return process.check(runner, ["mdadm", *argv])
    except CommandError as exc:
        raise MirrorError(f"{what}: {exc}") from None


def has_superblock(runner: Runner, device: str) -> bool:
    """True when the device carries an md superblock (it was a member before), False when
    mdadm says it has none. Any other failure (an I/O error) is an error: creating an
    array over members that could not be read would declare differing replicas in sync.
    Not --brief: that exits 0 on a device with no superblock at all."""
    result = runner(["mdadm", "--examine", device])
    if result.rc == 0:
        return True
    if "No md superblock detected" in result.stdout + result.stderr:
        return False
    raise MirrorError(f"reading the md superblock of {device}: {result.stderr.strip()}")


# md's 1.2 superblock: 4 KiB into the member; its magic, major version and event count.
SUPERBLOCK_AT = 4096
MD_MAGIC = 0xA92B4EFC
EVENTS_AT = 200


def events(device: str) -> int | None:
    """md's event count in the member's own superblock (None when it has none), read with
    no process and past the page cache: md writes superblocks under it, so a cached read
    could show a count from before the last failure. An unreadable device is an error."""
    try:
        try:
            fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            fd = os.open(device, os.O_RDONLY)  # a file system without O_DIRECT (tmpfs)
    except OSError as exc:
        raise MirrorError(f"reading the md superblock of {device}: {exc}") from None
    try:
        block = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
        if os.preadv(fd, [block], SUPERBLOCK_AT) < 4096:
            return None
    except OSError as exc:
        raise MirrorError(f"reading the md superblock of {device}: {exc}") from None
    finally:
        os.close(fd)
    magic, major = struct.unpack_from("<II", block, 0)
    if magic != MD_MAGIC or major != 1:
        return None
    return int(struct.unpack_from("<Q", block, EVENTS_AT)[0])


def create(runner: Runner, name: str, devices: Sequence[str]) -> str:
    """A new RAID1 over fresh replicas. --assume-clean: thin volumes read as zeros on
    every replica, so an initial sync would only allocate them in full."""
    _mdadm(
        runner,
        ["--create", md_path(name), "--run", "--level=1", f"--raid-devices={len(devices)}",
         "--metadata=1.2", "--bitmap=internal", "--assume-clean",
         f"--data-offset={mirrors.DATA_OFFSET // 1024}K", f"--name={name}",
         "--homehost=<none>", *devices],
        f"creating {name}",
    )  # fmt: skip
    return md_path(name)


def assemble(runner: Runner, name: str, devices: Sequence[str]) -> str:
    """Starts the array from exactly these members (degraded if fewer than all)."""
    if kernel_name(name) is None:
        _mdadm(runner, ["--assemble", md_path(name), "--run", *devices], f"assembling {name}")
    return md_path(name)


def re_add(runner: Runner, name: str, device: str) -> None:
    """Adds a member back; with the bitmap only what it missed is copied. A member the
    bitmap cannot cover is added as new (a full resync)."""
    if runner(["mdadm", md_path(name), "--re-add", device]).rc == 0:
        return
    runner(["mdadm", "--zero-superblock", device])
    _mdadm(runner, [md_path(name), "--add", device], f"adding {device} to {name}")


def remove_failed(runner: Runner, name: str) -> None:
    """Drops members md failed or whose device went away, so they can be added back."""
    for keyword in ("failed", "detached"):
        runner(["mdadm", md_path(name), "--remove", keyword])


# udev opens a block device to probe it whenever a writer closes it (its "watch" rule),
# so a stop right after the last write can meet the array busy for a moment.
STOP_TRIES = 20
STOP_PAUSE = 0.5


def stop(runner: Runner, name: str) -> None:
    for attempt in range(STOP_TRIES):
        if kernel_name(name) is None:
            break
        result = runner(["mdadm", "--stop", md_path(name)])
        if result.rc == 0:
            break
        busy = "busy" in (result.stderr + result.stdout).lower()
        if not busy or attempt == STOP_TRIES - 1:
            raise MirrorError(f"stopping {name}: {process.CommandError(result)}")
        time.sleep(STOP_PAUSE)
    forget(name)


def grow(runner: Runner, name: str) -> None:
    """The array takes its members' new size."""
    _mdadm(runner, ["--grow", md_path(name), "--size=max"], f"growing {name}")


@dataclass(frozen=True)
class ArrayState:
    members: dict[str, str]  # member block device (nvmeXnY) -> mirrors.member_state
    sync_action: str
    sync_completed: str


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def array_state(name: str, root: Path = SYS_BLOCK) -> ArrayState | None:
    md = kernel_name(name, root)
    if md is None:
        return None
    base = root / md / "md"
    members = {}
    for dev in sorted(base.glob("dev-*")):
        block = dev.name.removeprefix("dev-")
        members[block] = mirrors.member_state(_read(dev / "state"))
    return ArrayState(members, _read(base / "sync_action"), _read(base / "sync_completed"))


def watched_files(names: Sequence[str], root: Path = SYS_BLOCK) -> list[Path]:
    """The sysfs attributes md notifies on when an array's members change: each member's
    state (md failed it, it came back in sync), the degraded count, the sync action."""
    files: list[Path] = []
    for name in names:
        md = kernel_name(name, root)
        if md is None:
            continue
        base = root / md / "md"
        files += [base / "degraded", base / "sync_action"]
        files += [dev / "state" for dev in sorted(base.glob("dev-*"))]
    return files


def wait_for_change(names: Sequence[str], timeout: float, root: Path = SYS_BLOCK) -> bool:
    """Sleeps until md notifies a change of one of these arrays (True) or the timeout
    runs out (False): a failed member is seen within milliseconds, with no polling."""
    poller = select.poll()
    fds: list[int] = []
    try:
        for path in watched_files(names, root):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            fds.append(fd)
            with contextlib.suppress(OSError):
                os.read(fd, 4096)  # sysfs wakes a poller only for changes after a read
            poller.register(fd, select.POLLPRI | select.POLLERR)
        if not fds:  # none of them assembled now
            time.sleep(timeout)
            return False
        return bool(poller.poll(timeout * 1000))
    finally:
        for fd in fds:
            os.close(fd)
