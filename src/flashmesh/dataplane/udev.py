"""FlashMesh's devices kept away from the host's own storage automation.

A real node runs udev with its distribution's rules: `mdadm --incremental` for every device
that holds an md superblock (64-md-raid-assembly.rules) and LVM autoactivation for every
LVM physical volume (69-lvm.rules). FlashMesh's devices hold both: a mirror's legs carry md
superblocks, and a tenant's volume may carry its own LVM or md. Left to the host, a leg that
appears on a GPU node is grabbed by an inactive md127 (NodeStage's assembly then fails
"busy"), and a tenant's nested volume group is activated on a storage node's thin volume
(unstage and delete then fail "busy").

The node plugin and the agent therefore install one rule that hides what md's and LVM's
rules look for on FlashMesh's devices: where blkid found an md member or an LVM physical
volume (ID_FS_TYPE), the rule moves it to FLASHMESH_ID_FS_TYPE and clears ID_FS_TYPE, which
is the first thing both rule files test. Nothing else about the device changes: it stays
ready for systemd (multipath-tools' SYSTEMD_READY=0 would also do, but systemd may then
stop a mount on the device, and FlashMesh mounts its namespaces and arrays). FlashMesh
itself reads signatures with its own low-level probe, never from udev's database. The rule
runs after the persistent-storage rules and md's array rules (which set ID_FS_TYPE and
MD_NAME) and before md's assembly and LVM's rules, and matches:
- NVMe namespaces of FlashMesh subsystems (the subsystem NQN's prefix);
- device-mapper devices FlashMesh makes: its pools' logical volumes (flashmesh--<pool>-...)
  and the node plugin's stripes and crypt devices (fm-...);
- md arrays FlashMesh assembles (named fm-..., with no home host).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from flashmesh.core.naming import NQN_PREFIX
from flashmesh.dataplane import process
from flashmesh.dataplane.process import CommandError, Runner

log = logging.getLogger(__name__)

RULES_DIR = Path("/etc/udev/rules.d")
# Before 64-md-raid-assembly.rules ("64-f" sorts before "64-m") and 69-lvm.rules, after
# 60-persistent-storage.rules (ID_FS_TYPE) and 63-md-raid-arrays.rules (MD_NAME).
RULES_NAME = "64-flashmesh.rules"
# What md's assembly rule (linux_raid_member, and the ddf and isw containers it also
# assembles) and LVM's rule (LVM2_member) act on.
_MEMBER_TYPES = "linux_raid_member|ddf_raid_member|isw_raid_member|LVM2_member"
RULES = f"""\
# Written by FlashMesh's node plugin and agent (flashmesh.dataplane.udev); rewritten when
# they start. On FlashMesh's devices the host assembles no md array and activates no LVM
# volume group: the signature md's and LVM's rules look for is moved out of ID_FS_TYPE.
SUBSYSTEM!="block", GOTO="flashmesh_end"
ACTION=="remove", GOTO="flashmesh_end"
ENV{{ID_FS_TYPE}}!="{_MEMBER_TYPES}", GOTO="flashmesh_end"
KERNEL=="nvme*n*", ATTRS{{subsysnqn}}=="{NQN_PREFIX}*", GOTO="flashmesh_claim"
KERNEL=="dm-*", ENV{{DM_NAME}}=="flashmesh--*|fm-*", GOTO="flashmesh_claim"
KERNEL=="md*", ENV{{MD_NAME}}=="fm-*", GOTO="flashmesh_claim"
GOTO="flashmesh_end"
LABEL="flashmesh_claim"
ENV{{FLASHMESH_ID_FS_TYPE}}="$env{{ID_FS_TYPE}}"
ENV{{ID_FS_TYPE}}=""
LABEL="flashmesh_end"
"""
_CONTROL = Path("/run/udev/control")


def install_rules(rules_dir: Path = RULES_DIR, runner: Runner = process.run) -> bool:
    """Writes the rule where the host's udev reads it (when it differs) and has udev load
    it; True when it wrote. A host without udev (no rules folder) gets nothing."""
    if not rules_dir.is_dir():
        log.info("no %s: no udev rule installed", rules_dir)
        return False
    path = rules_dir / RULES_NAME
    with contextlib.suppress(OSError):
        if path.read_text() == RULES:
            return False
    # The node plugin and the agent of one node may both write at once: each its own
    # temporary file, each rename atomic, the same content either way.
    temp = path.with_name(f".{RULES_NAME}.{os.getpid()}.tmp")
    temp.write_text(RULES)
    os.replace(temp, path)
    log.info("udev rule %s installed: FlashMesh's devices are not auto-assembled", path)
    # udevd also notices changed rule folders on its own, before the events that follow.
    if _CONTROL.exists() and shutil.which("udevadm"):
        try:
            process.check(runner, ["udevadm", "control", "--reload"])
        except CommandError as exc:
            log.info("udev not told to reload (it will notice the rule itself): %s", exc)
    return True
