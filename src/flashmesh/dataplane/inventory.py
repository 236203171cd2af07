"""A storage node's drives as FlashMesh sees them: every whole disk with its size, model and
serial (lsblk), what it holds (blkid's low-level probe, which needs no udev) and whether it
is an LVM physical volume (pvs)."""

from __future__ import annotations

import json
from typing import Any

from flashmesh.core.drives import BlockDevice
from flashmesh.dataplane import process
from flashmesh.dataplane.lvm import Lvm
from flashmesh.dataplane.process import Runner

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


def parse_blkid(text: str) -> tuple[str | None, bool]:
    """(signature type, has a partition table) from `blkid -p -o export`."""
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return fields.get("TYPE"), "PTTYPE" in fields


def inventory(runner: Runner = process.run) -> list[BlockDevice]:
    pv_groups = {pv.path: pv.volume_group for pv in Lvm(runner).physical_volumes()}
    devices = []
    for disk in parse_lsblk(process.check(runner, LSBLK).stdout):
        probe = runner(("blkid", "--probe", "--output", "export", disk["path"]))
        # blkid exits 2 when the device holds nothing it knows.
        fstype, table = parse_blkid(probe.stdout) if probe.rc == 0 else (None, False)
        devices.append(
            BlockDevice(
                path=disk["path"],
                size=disk["size"],
                model=disk["model"],
                serial=disk["serial"],
                fstype=fstype,
                partitioned=disk["partitioned"] or table,
                mounted=disk["mounted"],
                volume_group=pv_groups.get(disk["path"]) or None,
            )
        )
    return devices
