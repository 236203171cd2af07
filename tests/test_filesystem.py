"""Filesystems over a runner that records argv and answers with output recorded in a lab
VM (blkid, dumpe2fs, xfs_logprint), and a fake mountinfo file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from flashmesh.dataplane import filesystem as fs
from flashmesh.dataplane.filesystem import FilesystemError
from flashmesh.dataplane.process import Result

DEVICE = "/dev/mapper/flashmesh-fm-0123456789ab"
# Recorded in a lab VM: dumpe2fs -h while mounted read-write, and after unmounting.
EXT4_MOUNTED = """\
Filesystem volume name:   <none>
Filesystem features:      has_journal ext_attr resize_inode dir_index filetype needs_recovery extent 64bit flex_bg sparse_super large_file huge_file dir_nlink extra_isize metadata_csum
Journal features:         journal_64bit journal_checksum_v3
"""  # noqa: E501
EXT4_CLEAN = EXT4_MOUNTED.replace(" needs_recovery", "")
XFS_MOUNTED = """\
xfs_logprint:
    data device: 0xfe00
    log device: 0xfe00 daddr: 327728 length: 131072

    log tail: 2 head: 8 state: <DIRTY>
"""
XFS_CLEAN = XFS_MOUNTED.replace("head: 8 state: <DIRTY>", "head: 14 state: <CLEAN>")
ROOT = "22 1 0:21 / / rw,relatime shared:1 - 9p host ro,trans=virtio\n"


class Tools:
    """Answers each tool (argv[0]) with a Result given in advance; records every command."""

    def __init__(self, **answers: tuple[int, str]) -> None:
        self.answers = answers
        self.argv: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> Result:
        self.argv.append(tuple(argv))
        rc, out = self.answers.get(argv[0].replace(".", "_"), (0, ""))
        return Result(tuple(argv), rc, out if rc == 0 else "", "" if rc == 0 else out)

    def commands(self) -> list[str]:
        return [" ".join(a) for a in self.argv]


def mountinfo(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text(ROOT + "".join(lines))
    return path


def mounted(target: str, options: str = "rw,relatime", source: str = DEVICE) -> str:
    return f"39 22 254:0 / {target} {options} - ext4 {source} rw,stripe=128\n"


def test_probe_says_blank_or_what_it_found() -> None:
    assert fs.probe(Tools(blkid=(2, "")), DEVICE) is None
    assert fs.probe(Tools(blkid=(0, f"DEVNAME={DEVICE}\nUUID=1\nTYPE=xfs\n")), DEVICE) == "xfs"
    tools = Tools(blkid=(0, "TYPE=ext4\nUSAGE=filesystem\n"))
    assert fs.probe(tools, DEVICE) == "ext4"
    assert tools.commands() == [f"blkid -p -o export {DEVICE}"]
    with pytest.raises(FilesystemError, match=f"cannot probe {DEVICE}: .* failed \\(4\\): no"):
        fs.probe(Tools(blkid=(4, "no such device")), DEVICE)


# What blkid -p -o export printed in a lab VM for a volume a user partitioned (sfdisk, one
# GPT partition): the table only, nothing under TYPE. Asking for TYPE alone (what the
# node plugin did) gave exit 0 and no output, which read as "blank", and mkfs.ext4 ran.
PARTITIONED = f"DEVNAME={DEVICE}\nPTUUID=7d0f3a4e-94f7-4f43-b2a5-7a7f0e7d7c11\nPTTYPE=gpt\n"


@pytest.mark.parametrize(
    ("rc", "out", "named"),
    [
        (0, PARTITIONED, "a gpt partition table"),
        (0, "TYPE=LVM2_member\nUSAGE=raid\n", "a LVM2_member signature"),
        (0, "PTTYPE=dos\nTYPE=ext4\n", "a ext4 signature and a dos partition table"),
        (8, "ambivalent result (probably more filesystems on the device)", "conflicting"),
        (0, "USAGE=other\n", "data blkid recognises but cannot name"),
    ],
)
def test_probe_refuses_anything_that_is_not_blank_or_a_filesystem_of_ours(
    rc: int, out: str, named: str
) -> None:
    """Neither mounted nor formatted: NotBlank (FAILED_PRECONDITION at NodeStage)."""
    tools = Tools(blkid=(rc, out))
    with pytest.raises(fs.NotBlank, match=f"{DEVICE} holds .*{named}") as refused:
        fs.probe(tools, DEVICE)
    assert "stage it as a block volume" in str(refused.value)
    with pytest.raises(fs.NotBlank):
        fs.make(tools, DEVICE, "ext4")
    assert not [c for c in tools.commands() if c.startswith("mkfs")]


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_make_on_a_blank_device(fstype: str) -> None:
    tools = Tools(blkid=(2, ""))
    fs.make(tools, DEVICE, fstype)
    assert tools.commands()[1] == f"mkfs.{fstype} -q {DEVICE}"


def test_make_refuses_a_device_that_holds_something() -> None:
    tools = Tools(blkid=(0, "TYPE=xfs\n"))
    with pytest.raises(
        FilesystemError, match=f"refusing to make ext4 on {DEVICE}: it already holds xfs"
    ):
        fs.make(tools, DEVICE, "ext4")
    assert [a[0] for a in tools.argv] == ["blkid"]


@pytest.mark.parametrize("fstype", ["btrfs", "ext3", ""])
def test_other_filesystems_are_refused(fstype: str) -> None:
    tools = Tools()
    for call in (
        lambda: fs.make(tools, DEVICE, fstype),
        lambda: fs.grow(tools, DEVICE, "/mnt", fstype),
        lambda: fs.needs_recovery(tools, DEVICE, fstype),
        lambda: fs.readonly_options(fstype),
    ):
        with pytest.raises(FilesystemError, match="is not supported: use one of ext4, xfs"):
            call()
    assert tools.argv == []


def test_a_failed_mkfs_names_the_device() -> None:
    tools = Tools(blkid=(2, ""), mkfs_xfs=(1, "Filesystem must be larger than 300MB."))
    with pytest.raises(FilesystemError, match=f"making xfs on {DEVICE} failed: .*300MB"):
        fs.make(tools, DEVICE, "xfs")


def test_mount_is_idempotent(tmp_path: Path) -> None:
    target = str(tmp_path / "staging" / "vol")
    tools = Tools()
    info = mountinfo(tmp_path)
    assert fs.mount(tools, DEVICE, target, "ext4", ("noatime",), mountinfo=info) is True
    assert Path(target).is_dir()  # made for mount
    assert tools.commands() == [f"mount -t ext4 -o noatime {DEVICE} {target}"]
    info = mountinfo(tmp_path, mounted(target))
    assert fs.mount(tools, DEVICE, target + "/", "ext4", mountinfo=info) is False
    assert len(tools.argv) == 1


def test_read_only_mounts_never_replay_the_journal(tmp_path: Path) -> None:
    assert fs.readonly_options("ext4") == ("ro", "noload")
    assert fs.readonly_options("xfs") == ("ro", "norecovery")
    tools = Tools()
    fs.mount(
        tools, DEVICE, str(tmp_path / "ro"), "xfs", fs.readonly_options("xfs"), mountinfo(tmp_path)
    )
    assert tools.commands() == [f"mount -t xfs -o ro,norecovery {DEVICE} {tmp_path / 'ro'}"]


def test_mount_refuses_another_device_or_mode_at_the_target(tmp_path: Path) -> None:
    target = str(tmp_path / "t")
    other = mountinfo(tmp_path, mounted(target, source="/dev/nvme1n1"))
    with pytest.raises(FilesystemError, match=f"{target} already has /dev/nvme1n1 mounted, not"):
        fs.mount(Tools(), DEVICE, target, "ext4", mountinfo=other)
    ro = mountinfo(tmp_path, mounted(target, options="ro,relatime"))
    with pytest.raises(FilesystemError, match=r"is mounted read-only at .* asked rw: unmount"):
        fs.mount(Tools(), DEVICE, target, "ext4", mountinfo=ro)
    assert fs.mount(Tools(), DEVICE, target, "ext4", ("ro", "noload"), mountinfo=ro) is False


def test_unmount_is_idempotent(tmp_path: Path) -> None:
    target = "/var/lib/kubelet/x y"  # mountinfo escapes the space
    tools = Tools()
    assert fs.unmount(tools, target, mountinfo(tmp_path)) is False
    info = mountinfo(tmp_path, mounted("/var/lib/kubelet/x\\040y"))
    assert fs.mounted_at(target, info) is not None
    assert fs.unmount(tools, target, info) is True
    assert tools.argv == [("umount", target)]


def test_a_failed_mount_or_unmount_says_which(tmp_path: Path) -> None:
    tools = Tools(umount=(32, "umount: /mnt/v: target is busy."), mount=(32, "wrong fs type"))
    with pytest.raises(FilesystemError, match=r"unmounting /mnt/v failed: .*busy"):
        fs.unmount(tools, "/mnt/v", mountinfo(tmp_path, mounted("/mnt/v")))
    with pytest.raises(FilesystemError, match=f"mounting {DEVICE} at .* failed: .*wrong fs"):
        fs.mount(tools, DEVICE, str(tmp_path / "m"), "xfs", mountinfo=mountinfo(tmp_path))


@pytest.mark.parametrize(
    ("fstype", "argv"),
    [("ext4", f"resize2fs {DEVICE}"), ("xfs", "xfs_growfs /mnt/v")],
)
def test_grow_uses_each_filesystems_online_tool(fstype: str, argv: str) -> None:
    tools = Tools()
    fs.grow(tools, DEVICE, "/mnt/v", fstype)
    assert tools.commands() == [argv]


@pytest.mark.parametrize(
    ("fstype", "tool", "dirty", "clean"),
    [
        ("ext4", "dumpe2fs", EXT4_MOUNTED, EXT4_CLEAN),
        ("xfs", "xfs_logprint", XFS_MOUNTED, XFS_CLEAN),
    ],
)
def test_needs_recovery_reads_the_journal_state(
    fstype: str, tool: str, dirty: str, clean: str
) -> None:
    tools = Tools(**{tool: (0, dirty)})
    assert fs.needs_recovery(tools, DEVICE, fstype) is True
    assert fs.needs_recovery(Tools(**{tool: (0, clean)}), DEVICE, fstype) is False
    assert tools.commands() == [
        f"dumpe2fs -h {DEVICE}" if fstype == "ext4" else f"xfs_logprint -t {DEVICE}"
    ]
    with pytest.raises(FilesystemError, match=f"is it {fstype}"):
        fs.needs_recovery(Tools(**{tool: (0, "nothing useful")}), DEVICE, fstype)
    with pytest.raises(FilesystemError, match=f"cannot read the journal state of {DEVICE}"):
        fs.needs_recovery(Tools(**{tool: (1, "Bad magic number")}), DEVICE, fstype)


def test_mountinfo_lines_parse() -> None:
    (root, mount) = fs.parse_mountinfo(ROOT + mounted("/mnt/a", "ro,relatime"))
    assert (root.mountpoint, root.fstype, root.read_only) == ("/", "9p", False)
    assert mount == fs.Mount(
        "254:0", "/mnt/a", ("ro", "relatime"), "ext4", DEVICE, ("rw", "stripe=128")
    )
    assert mount.read_only
