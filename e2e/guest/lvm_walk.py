"""Runs inside a storage VM: FlashMesh's drive inventory and selection, then its LVM layer
on one selected drive: volume group, thin pool, a segment grown, snapshotted and removed.
Prints what it saw, as JSON.

    python lvm_walk.py DRIVE VOLUME_GROUP
"""

from __future__ import annotations

import json
import sys

from flashmesh.core.drives import select_drives
from flashmesh.dataplane.inventory import inventory
from flashmesh.dataplane.lvm import Lvm


def main(drive: str, vg: str) -> None:
    devices = inventory()
    chosen = select_drives(devices, ["/dev/nvme*n1"], 128 << 20, vg)
    tool = Lvm()
    tool.ensure_volume_group(vg, [drive])
    pool = tool.ensure_thin_pool(vg)
    made = tool.ensure_volume(vg, "fm-0000000000e2-s0r0", 32 << 20)
    grown = tool.ensure_volume(vg, "fm-0000000000e2-s0r0", 48 << 20)
    again = tool.ensure_volume(vg, "fm-0000000000e2-s0r0", 16 << 20)
    snap = tool.ensure_snapshot(vg, "fm-0000000000e2-s0r0", "fs-0000000000e2-s0r0")
    listed = [lv.name for lv in tool.logical_volumes(vg)]
    removed = [
        tool.remove_volume(vg, "fs-0000000000e2-s0r0"),
        tool.remove_volume(vg, "fm-0000000000e2-s0r0"),
        tool.remove_volume(vg, "fm-0000000000e2-s0r0"),
    ]
    json.dump(
        {
            "devices": {
                d.path: {"size": d.size, "serial": d.serial, "vg": d.volume_group} for d in devices
            },
            "selected": [d.path for d in chosen.selected],
            "refused": {r.path: r.reason for r in chosen.refused},
            "pool": {"segtype": pool.segtype, "size": pool.size},
            "sizes": [made.size, grown.size, again.size],
            "snapshot": {"origin": snap.origin, "active": snap.active},
            "listed": listed,
            "removed": removed,
            "left": [lv.name for lv in tool.logical_volumes(vg)],
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
