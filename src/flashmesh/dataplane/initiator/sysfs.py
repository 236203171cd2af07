"""Reads the NVMe host side of sysfs: the subsystem that carries an NQN, its controllers
(one per path, with their address and state) and its namespaces' block devices.

The layout, as Debian's 6.12 kernel shows it with native multipath (the default):

    /sys/class/nvme-subsystem/nvme-subsys2/subsysnqn     the subsystem's NQN
    /sys/class/nvme-subsystem/nvme-subsys2/nvme2 -> ...  a controller (a path), as a link
    /sys/class/nvme-subsystem/nvme-subsys2/nvme2n1/      the multipath head: /dev/nvme2n1
    /sys/class/nvme-subsystem/nvme-subsys2/ng2n1/        its char device (not a block device)
    /sys/class/nvme/nvme2/{address,state,transport,hostnqn,fast_io_fail_tmo,...}

`address` reads `traddr=10.77.0.1,trsvcid=4420,src_addr=10.77.0.101` for TCP. The head's
name does not encode the namespace id (its numbers are instance counters), so the id is
read from its `nsid` file. Without multipath (nvme_core.multipath=N) the namespace sits
under its controller instead, which is looked at too. Controllers come and go while this
reads (a path being deleted), so a file that vanishes is taken as that entry being gone.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

SYSFS = Path("/sys")
# A controller in these states is (or will again be) a path: connecting again is wrong.
ACTIVE_STATES = frozenset({"new", "live", "connecting", "resetting"})
_CONTROLLER = re.compile(r"nvme\d+")
_NAMESPACE = re.compile(r"nvme\d+n\d+")  # not nvme0c0n1 (a hidden path), not ng0n1


@dataclass(frozen=True)
class Controller:
    """One path to a subsystem: /dev/<name>, /sys/class/nvme/<name>."""

    name: str
    transport: str
    traddr: str
    trsvcid: str
    state: str
    hostnqn: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def reaches(self, transport: str, traddr: str, trsvcid: str) -> bool:
        return (self.transport, self.traddr, self.trsvcid) == (transport, traddr, trsvcid)


@dataclass(frozen=True)
class Subsystem:
    name: str
    nqn: str
    controllers: tuple[Controller, ...] = ()
    # Namespace id -> block device name (nvme2n1).
    namespaces: dict[int, str] = field(default_factory=dict)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # gone while we looked, or not readable (being deleted)
        return None


def parse_address(text: str) -> dict[str, str]:
    """`traddr=10.77.0.1,trsvcid=4420,src_addr=...` as a dict; a PCIe controller's address
    (`0000:00:04.0`) comes back as its traddr."""
    if "=" not in text:
        return {"traddr": text.strip()} if text.strip() else {}
    pairs = (item.split("=", 1) for item in text.strip().split(",") if "=" in item)
    return {key.strip(): value.strip() for key, value in pairs}


def read_controller(path: Path) -> Controller | None:
    """The controller whose sysfs directory (or link to it) is path; None if it is gone."""
    state = _read(path / "state")
    if state is None:
        return None
    address = parse_address(_read(path / "address") or "")
    return Controller(
        name=path.name,
        transport=_read(path / "transport") or "",
        traddr=address.get("traddr", ""),
        trsvcid=address.get("trsvcid", ""),
        state=state,
        hostnqn=_read(path / "hostnqn") or "",
    )


def _namespaces(directory: Path) -> dict[int, str]:
    found: dict[int, str] = {}
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return found
    for entry in entries:
        if not _NAMESPACE.fullmatch(entry.name):
            continue
        nsid = _read(entry / "nsid")
        if nsid is not None and nsid.isdigit():
            found[int(nsid)] = entry.name
    return found


def read_subsystem(path: Path) -> Subsystem | None:
    nqn = _read(path / "subsysnqn")
    if nqn is None:
        return None
    controllers: list[Controller] = []
    namespaces = _namespaces(path)
    try:
        entries = sorted(path.iterdir())
    except OSError:
        return None
    for entry in entries:
        if not _CONTROLLER.fullmatch(entry.name):
            continue
        controller = read_controller(entry)
        if controller is not None:
            controllers.append(controller)
            # Without native multipath the namespace hangs off its controller.
            for nsid, name in _namespaces(entry).items():
                namespaces.setdefault(nsid, name)
    return Subsystem(path.name, nqn, tuple(controllers), namespaces)


def subsystems(root: Path = SYSFS) -> list[Subsystem]:
    """Every NVMe subsystem the host sees (local PCIe drives too)."""
    base = root / "class" / "nvme-subsystem"
    if not base.is_dir():
        return []
    found = (read_subsystem(path) for path in sorted(base.iterdir()))
    return [s for s in found if s is not None]


def find_subsystem(nqn: str, root: Path = SYSFS) -> Subsystem | None:
    return next((s for s in subsystems(root) if s.nqn == nqn), None)


def namespace_device(nqn: str, nsid: int = 1, root: Path = SYSFS) -> str | None:
    """/dev/nvmeXnY of the subsystem's namespace (FlashMesh exports namespace 1), or None
    while the host has not found it yet."""
    subsystem = find_subsystem(nqn, root)
    if subsystem is None or nsid not in subsystem.namespaces:
        return None
    return f"/dev/{subsystem.namespaces[nsid]}"


def path_states(nqn: str, root: Path = SYSFS) -> list[tuple[str, str, str, str]]:
    """(transport, traddr, trsvcid, state) of each path to the subsystem, sorted."""
    subsystem = find_subsystem(nqn, root)
    if subsystem is None:
        return []
    return sorted((c.transport, c.traddr, c.trsvcid, c.state) for c in subsystem.controllers)


def controller_attribute(controller: str, attribute: str, root: Path = SYSFS) -> Path:
    """A controller's sysfs attribute, e.g. fast_io_fail_tmo of nvme2."""
    return root / "class" / "nvme" / controller / attribute


def block_name(path: str) -> str:
    """The kernel's name of a device path, through links such as /dev/md/<name> or
    /dev/mapper/<name> (which name nothing in sysfs themselves)."""
    return Path(os.path.realpath(path)).name


def block_sectors(device: str, root: Path = SYSFS) -> int | None:
    """A block device's size in 512-byte sectors (what sysfs reports whatever the logical
    block size), or None when there is no such device."""
    size = _read(root / "class" / "block" / Path(device).name / "size")
    return int(size) if size is not None and size.isdigit() else None
