"""FlashMesh's devices kept away from the host's own storage automation.

A real node runs udev with its distribution's rules: `mdadm --incremental` for every device
that holds an md superblock (64-md-raid-assembly.rules) and LVM autoactivation for every
LVM physical volume (69-lvm.rules). FlashMesh's devices hold both: a mirror's legs carry md
superblocks, and a tenant's volume may carry its own LVM or md. Left to the host, a leg that
appears on a GPU node is grabbed by an inactive md127 (NodeStage's assembly then fails
"busy"), and a tenant's nested volume group is activated on a storage node's thin volume
(unstage and delete then fail "busy").

The node plugin and the agent therefore install one rule that marks FlashMesh's devices as
claimed, the way multipath-tools marks its path devices: SYSTEMD_READY=0 (md's rules skip
the device) and DM_MULTIPATH_DEVICE_PATH=1 (LVM's rules skip it). It runs after the
persistent-storage rules and before md's and LVM's, and matches:
- NVMe namespaces of FlashMesh subsystems (the subsystem NQN's prefix);
- device-mapper devices FlashMesh makes: its pools' logical volumes (flashmesh--<pool>-...)
  and the node plugin's stripes and crypt devices (fm-...);
- md arrays FlashMesh assembles (named fm-...).
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
# 60-persistent-storage.rules (ID_FS_TYPE) and 63-md-raid-arrays.rules (MD_DEVNAME).
RULES_NAME = "64-flashmesh.rules"
RULES = f"""\
# Written by FlashMesh's node plugin and agent (flashmesh.dataplane.udev); rewritten when
# they start. FlashMesh's devices are claimed: the host assembles no md array and
# activates no LVM volume group found on them.
SUBSYSTEM!="block", GOTO="flashmesh_end"
ACTION=="remove", GOTO="flashmesh_end"
KERNEL=="nvme*n*", ATTRS{{subsysnqn}}=="{NQN_PREFIX}*", GOTO="flashmesh_claim"
KERNEL=="dm-*", ENV{{DM_NAME}}=="flashmesh--*|fm-*", GOTO="flashmesh_claim"
KERNEL=="md*", ENV{{MD_DEVNAME}}=="fm-*", GOTO="flashmesh_claim"
GOTO="flashmesh_end"
LABEL="flashmesh_claim"
ENV{{SYSTEMD_READY}}="0"
ENV{{DM_MULTIPATH_DEVICE_PATH}}="1"
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
    temp = path.with_name(f".{RULES_NAME}.tmp")
    temp.write_text(RULES)
    os.replace(temp, path)
    log.info("udev rule %s installed: FlashMesh's devices are not auto-assembled", path)
    if _CONTROL.exists() and shutil.which("udevadm"):
        try:
            process.check(runner, ["udevadm", "control", "--reload"])
        except CommandError as exc:  # udevd also reloads on its own when rules change
            log.warning("udev did not reload its rules: %s", exc)
    return True
