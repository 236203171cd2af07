"""Filesystems on an assembled volume: probe, make (ext4 or xfs, only on a blank device),
mount and unmount (idempotent, read from mountinfo), grow online, and whether the journal
needs replaying.

A volume published read-only to many nodes is mounted with `readonly_options`: ext4
`noload` and xfs `norecovery` keep a reader from replaying (writing) a journal that the
writer left dirty; such a reader sees the filesystem as of its last checkpoint, which is
why `needs_recovery` exists: publish read-only after the writer unmounted cleanly.

Found in the lab: mkfs.ext4 without a terminal formats over an existing filesystem (or a
partition table) without asking, so `probe` and `make` refuse anything but a blank device
or a filesystem of ours (see `signatures`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flashmesh.dataplane import process, signatures
from flashmesh.dataplane.process import CommandError, Runner

MOUNTINFO = Path("/proc/self/mountinfo")
FILESYSTEMS = ("ext4", "xfs")
READ_ONLY = {"ext4": ("ro", "noload"), "xfs": ("ro", "norecovery")}
_MKFS = {"ext4": ["mkfs.ext4", "-q"], "xfs": ["mkfs.xfs", "-q"]}


class FilesystemError(RuntimeError):
    pass


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo."""

    device: str  # major:minor
    mountpoint: str
    options: tuple[str, ...]  # per mount: ro or rw, relatime, ...
    fstype: str
    source: str
    # The filesystem's own: ext4's noload shows here as norecovery.
    super_options: tuple[str, ...] = ()

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _supported(fstype: str) -> None:
    if fstype not in FILESYSTEMS:
        raise FilesystemError(
            f"filesystem type {fstype!r} is not supported: use one of {', '.join(FILESYSTEMS)}"
        )


def readonly_options(fstype: str) -> tuple[str, ...]:
    """Mount options for a read-only mount that never writes the journal."""
    _supported(fstype)
    return READ_ONLY[fstype]


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040-style octal escapes.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        mounts.append(
            Mount(
                device=fields[2],
                mountpoint=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fstype=fields[dash + 1],
                source=_unescape(fields[dash + 2]),
                super_options=tuple(fields[dash + 3].split(",")) if len(fields) > dash + 3 else (),
            )
        )
    return mounts


def mounted_at(target: str, mountinfo: Path = MOUNTINFO) -> Mount | None:
    """What is mounted at target (the last, uppermost mount), or None."""
    path = os.path.normpath(target)
    found = [m for m in parse_mountinfo(mountinfo.read_text()) if m.mountpoint == path]
    return found[-1] if found else None


def _device_number(device: str) -> str | None:
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return None
    return f"{os.major(rdev)}:{os.minor(rdev)}" if rdev else None


def _same_device(mount: Mount, device: str) -> bool:
    # The source is what mount(8) was given; two paths (/dev/dm-0, /dev/mapper/x) may
    # name one device, which major:minor settles.
    return mount.source == device or mount.device == _device_number(device)


class NotBlank(FilesystemError):
    """The device holds something that is not a filesystem this driver mounts: formatting
    it would destroy it, so it is refused (a precondition the user must settle)."""


def probe(runner: Runner, device: str) -> str | None:
    """The filesystem on device, or None when it holds nothing at all. A partition table,
    an unsupported or unnamed signature, or conflicting signatures raise NotBlank: the
    device is neither blank nor mountable."""
    try:
        found = signatures.probe(runner, device)
    except signatures.ProbeError as exc:
        raise FilesystemError(str(exc)) from None
    if found is None:
        return None
    if found.filesystem in FILESYSTEMS:
        return found.filesystem
    raise NotBlank(
        f"{device} holds {found.describe()}, not an {' or '.join(FILESYSTEMS)} filesystem: "
        "it is neither formatted nor mounted (was it written as a raw block volume? stage "
        "it as a block volume, or wipe it by hand if its data is not wanted)"
    )


def make(runner: Runner, device: str, fstype: str) -> None:
    """Makes an ext4 or xfs filesystem on a blank device; refuses one that holds anything."""
    _supported(fstype)
    found = probe(runner, device)
    if found is not None:
        raise NotBlank(
            f"refusing to make {fstype} on {device}: it already holds {found} "
            "(wipe it by hand if its data is not wanted)"
        )
    try:
        process.check(runner, [*_MKFS[fstype], device])
    except CommandError as exc:
        raise FilesystemError(f"making {fstype} on {device} failed: {exc}") from None


def mount(
    runner: Runner,
    device: str,
    target: str,
    fstype: str,
    options: Sequence[str] = (),
    mountinfo: Path = MOUNTINFO,
) -> bool:
    """Mounts device at target (made if missing); False when it is already mounted there.
    Something else at target, or the same device mounted rw where ro is asked (or the
    other way), is an error: remounting under a user is not this function's to do."""
    _supported(fstype)
    existing = mounted_at(target, mountinfo)
    want_ro = "ro" in options
    if existing is not None:
        if not _same_device(existing, device):
            raise FilesystemError(
                f"{target} already has {existing.source} mounted, not {device}: unmount it first"
            )
        if existing.read_only != want_ro:
            mode = "read-only" if existing.read_only else "read-write"
            raise FilesystemError(
                f"{device} is mounted {mode} at {target}, asked {'ro' if want_ro else 'rw'}: "
                "unmount it first"
            )
        return False
    Path(target).mkdir(parents=True, exist_ok=True)
    argv = ["mount", "-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    try:
        process.check(runner, [*argv, device, target])
    except CommandError as exc:
        raise FilesystemError(f"mounting {device} at {target} failed: {exc}") from None
    return True


def unmount(runner: Runner, target: str, mountinfo: Path = MOUNTINFO) -> bool:
    """Unmounts target; False when nothing was mounted there."""
    if mounted_at(target, mountinfo) is None:
        return False
    try:
        process.check(runner, ["umount", target])
    except CommandError as exc:
        raise FilesystemError(f"unmounting {target} failed: {exc}") from None
    return True


def grow(runner: Runner, device: str, mountpoint: str, fstype: str) -> None:
    """Grows a mounted filesystem to its device's size (a no-op when it already fills it)."""
    _supported(fstype)
    argv = ["resize2fs", device] if fstype == "ext4" else ["xfs_growfs", mountpoint]
    try:
        process.check(runner, argv)
    except CommandError as exc:
        raise FilesystemError(f"growing {fstype} on {device} failed: {exc}") from None


def needs_recovery(runner: Runner, device: str, fstype: str) -> bool:
    """Whether the journal holds changes not yet written in place: true while it is
    mounted read-write, and after a crash until a read-write mount replays it."""
    _supported(fstype)
    if fstype == "ext4":
        out = _read(runner, ["dumpe2fs", "-h", device], device)
        features = next(
            (line for line in out.splitlines() if line.startswith("Filesystem features:")), None
        )
        if features is None:
            raise FilesystemError(f"dumpe2fs -h {device} shows no features: is it ext4?")
        return "needs_recovery" in features.split()
    # xfs_logprint -t ends its header with `state: <CLEAN>` or `state: <DIRTY>`.
    out = _read(runner, ["xfs_logprint", "-t", device], device)
    if "<DIRTY>" in out:
        return True
    if "<CLEAN>" in out:
        return False
    raise FilesystemError(f"xfs_logprint -t {device} shows no log state: is it xfs?")


def _read(runner: Runner, argv: list[str], device: str) -> str:
    try:
        return process.check(runner, argv).stdout
    except CommandError as exc:
        raise FilesystemError(f"cannot read the journal state of {device}: {exc}") from None
