"""A storage node's drives as FlashMesh sees them: every whole disk with its size, model and
serial (lsblk), what it holds (blkid's low-level probe, which needs no udev), whether it
is an LVM physical volume (pvs), and whether it is a local drive at all: an NVMe namespace
reached over a fabric (a node that is also a GPU node has FlashMesh volumes connected) or
one of a FlashMesh subsystem is somebody's volume, never a drive to pool (sysfs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flashmesh.core import naming
from flashmesh.core.drives import BlockDevice
from flashmesh.dataplane import process, signatures
from flashmesh.dataplane.initiator import sysfs
from flashmesh.dataplane.lvm import Lvm
from flashmesh.dataplane.process import Runner

BY_ID = Path("/dev/disk/by-id")
LSBLK = ("lsblk", "--json", "--bytes", "--output", "PATH,SIZE,MODEL,SERIAL,TYPE,MOUNTPOINTS")


def parse_lsblk(text: str) -> list[dict[str, Any]]:
    """The whole disks of lsblk's JSON, each with its partitions and mounts folded in."""
    disks = []
    for dev in json.loads(text).get("blockdevices", []):
        if dev.get("type") != "disk":
            continue
        children = dev.get("children") or []
        mounts = [m for d in [dev, *children] for m in (d.get("mountpoints") or []) if m]
        disks.append({
            "path": dev["path"],
            "size": int(dev["size"]),
            "model": (dev.get("model") or "").strip() or None,
            "serial": (dev.get("serial") or "").strip() or None,
            "partitioned": any(c.get("type") == "part" for c in children),
            "mounted": bool(mounts),
        })  # fmt: skip
    return disks


def not_local(root: Path = sysfs.SYSFS) -> dict[str, str]:
    """/dev path -> why, for every NVMe namespace that is not a local drive: one reached over
    a fabric (any controller whose transport is not pcie) or one of a FlashMesh subsystem."""
    found = {}
    for subsystem in sysfs.subsystems(root):
        remote = sorted({c.transport for c in subsystem.controllers} - {"pcie", ""})
        if remote:
            why = f"is an NVMe-oF namespace ({'/'.join(remote)}, subsystem {subsystem.nqn})"
        elif naming.is_flashmesh_nqn(subsystem.nqn):
            why = f"is a namespace of FlashMesh subsystem {subsystem.nqn}"
        else:
            continue
        for name in subsystem.namespaces.values():
            found[f"/dev/{name}"] = why
    return found


def stable_names(by_id: Path = BY_ID) -> dict[str, tuple[str, ...]]:
    """/dev path -> udev's /dev/disk/by-id links to it (none where no udev runs)."""
    found: dict[str, list[str]] = {}
    try:
        links = list(os.scandir(by_id))
    except OSError:
        return {}
    for link in links:
        found.setdefault(os.path.realpath(link.path), []).append(link.path)
    return {path: tuple(sorted(names)) for path, names in found.items()}


def inventory(runner: Runner = process.run, root: Path = sysfs.SYSFS) -> list[BlockDevice]:
    pv_groups = {pv.path: pv.volume_group for pv in Lvm(runner).physical_volumes()}
    remote = not_local(root)
    names = stable_names()
    devices = []
    for disk in parse_lsblk(process.check(runner, LSBLK).stdout):
        # Only blkid's "nothing found" is blank: conflicting signatures, or a probe that
        # fails, leave the drive refused (untouched), never pooled.
        problem = None
        try:
            found = signatures.probe(runner, disk["path"])
        except signatures.ProbeError as exc:
            found, problem = None, f"could not be probed ({exc})"
        if found is not None and (found.ambivalent or not (found.type or found.partition_table)):
            problem = f"holds {found.describe()}"
        devices.append(
            BlockDevice(
                path=disk["path"],
                size=disk["size"],
                model=disk["model"],
                serial=disk["serial"],
                fstype=found.type if found else None,
                partitioned=disk["partitioned"] or bool(found and found.partition_table),
                unknown=problem,
                remote=remote.get(disk["path"]),
                mounted=disk["mounted"],
                volume_group=pv_groups.get(disk["path"]) or None,
                stable_names=names.get(disk["path"], ()),
            )
        )
    return devices
