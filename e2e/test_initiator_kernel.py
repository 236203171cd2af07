"""FlashMesh's host side on the real kernel: in gpu-0, its initiator, assembly and filesystem
modules (with the real runner) connect two segments exported by hand from the two storage
VMs, stripe them with device-mapper, make, mount and read back ext4 and then xfs, follow
the segments as they grow, and leave nothing behind."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import GPU0, STORAGE0, STORAGE1, Scenario, sh

from flashmesh.lab.vm import Lab, VmSpec, host_nqn, vm_uuid

pytestmark = pytest.mark.kernel

WALK = Path(__file__).resolve().parent / "guest" / "initiator_walk.py"
GPU = GPU0.name
# Not FlashMesh's NQN prefix: a storage agent running in the same session leaves these alone.
NQN = "nqn.2026-11.dev.lab:initiator-"
# A host identity of its own, so the key set for it on storage-0 binds no other scenario.
HOST_ID = vm_uuid(f"{GPU}-initiator")
HOST = host_nqn(f"{GPU}-initiator")
# A port of its own, beside the other scenarios' 4420.
PORT_ID, PORT = 21, "4431"
MIB = [96, 176, 208]  # each segment: made, grown for xfs (which wants 300 MiB), grown again
# (VM, drive number, logical volume): the drives of the hand-made volume group fmlab.
SEGMENTS: list[tuple[VmSpec, int, str]] = [(STORAGE0, 2, "init-a"), (STORAGE1, 0, "init-b")]


def export(lab: Lab, spec: VmSpec, drive: int, lv: str, key: str) -> None:
    serial = lab.drive_serial(spec.name, drive)
    sh(
        lab,
        spec.name,
        f"dev=$(lvm_volume $(drive_by_serial {serial}) {lv} {MIB[0]}M)\n"
        f"nvmet_subsystem {NQN}{lv} $dev 0\n"
        f"nvmet_allow_host {NQN}{lv} {HOST} {shlex.quote(key)}\n"
        f"nvmet_port {PORT_ID} tcp {spec.address(0)} {PORT} {NQN}{lv}",
    )


def unexport(lab: Lab, vm: str, lv: str) -> None:
    """Unlinks port and host, removes namespace, subsystem, host and port (each only if
    there: the export may have failed half way), and the logical volume."""
    s, n = f"$NVMET/subsystems/{NQN}{lv}", f"{NQN}{lv}"
    sh(
        lab,
        vm,
        f"rm -f $NVMET/ports/{PORT_ID}/subsystems/{n} {s}/allowed_hosts/{HOST}\n"
        f"rmdir $NVMET/ports/{PORT_ID} $NVMET/hosts/{HOST} 2>/dev/null || true\n"
        f"if [ -d {s}/namespaces/1 ]; then\n"
        f"  echo 0 > {s}/namespaces/1/enable; rmdir {s}/namespaces/1\n"
        f"fi\n"
        f"if [ -d {s} ]; then rmdir {s}; fi\n"
        f"lvremove -q -y fmlab/{lv} >/dev/null 2>&1 || true",
        check=False,
    )


def walk(lab: Lab, config: dict[str, Any], step: str, *args: str, check: bool = True) -> str:
    """The guest walk's whole output: FlashMesh's command log, then its JSON line."""
    command = f"{sys.executable} {WALK} {step} {shlex.quote(json.dumps(config))} {' '.join(args)}"
    return sh(lab, GPU, command, timeout=900, check=check)


def result(output: str, key: str) -> dict[str, Any]:
    assert key not in output, "a DH-HMAC-CHAP key reached the log"
    seen: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return seen


def grow(lab: Lab, mib: int) -> None:
    for spec, _, lv in SEGMENTS:
        sh(lab, spec.name, f"lvextend -q -L {mib}M fmlab/{lv}")


def test_segments_connect_assemble_format_grow_and_go(lab: Lab, scenario: Scenario) -> None:
    key = sh(lab, STORAGE0.name, f"nvme gen-dhchap-key -n {HOST}").strip()
    assert key.startswith("DHHC-1:")
    name = "flashmesh-fm-0000000000a1"
    config = {
        "hostnqn": HOST,
        "hostid": HOST_ID,
        "name": name,
        "segment_mib": MIB[0],
        "mount": "/tmp/fm-initiator",
        "segments": [
            # storage-0 asks this host for the key; storage-1 admits it without one.
            {"nqn": f"{NQN}init-a", "traddr": STORAGE0.address(0), "trsvcid": PORT, "key": key},
            {"nqn": f"{NQN}init-b", "traddr": STORAGE1.address(0), "trsvcid": PORT},
        ],
    }
    sectors = [m * 2048 * 2 for m in MIB]  # 2 segments of 2048 sectors per MiB
    torn_down = False
    try:
        export(lab, STORAGE0, 2, "init-a", key)
        export(lab, STORAGE1, 0, "init-b", "")

        out = walk(lab, config, "assemble")
        # Written to /dev/nvme-fabrics: no `nvme connect`, so no command line with the key.
        assert f"connect {NQN}init-a at tcp" in out and "run: nvme connect" not in out
        made = result(out, key)
        assert made["again"] == made["devices"] and len(set(made["devices"])) == 2
        assert [len(c) for c in made["controllers"]] == [1, 1]  # connecting again made none
        assert [p[0][3] for p in made["paths"]] == ["live", "live"]
        for timeouts in made["timeouts"]:
            assert timeouts == {"fast_io_fail_tmo": "5", "ctrl_loss_tmo": "30", "kato": "5"}
        assert made["sectors"] == [sectors[0] // 2] * 2
        assert made["path"] == f"/dev/mapper/{name}"
        assert made["table"] == made["table_again"]
        assert made["table"].split()[:5] == ["0", str(sectors[0]), "striped", "2", "128"]

        ext4 = result(walk(lab, config, "fs", "ext4"), key)
        grow(lab, MIB[1])
        ext4_grown = result(walk(lab, config, "grow", "ext4", str(MIB[1])), key)
        xfs = result(walk(lab, config, "fs", "xfs"), key)
        grow(lab, MIB[2])
        xfs_grown = result(walk(lab, config, "grow", "xfs", str(MIB[2])), key)

        # make() will not format over a filesystem (the walk then wipes it by hand).
        assert "refusing to make xfs" in xfs["refused"] and "holds ext4" in xfs["refused"]
        for fs, fstype in ((ext4, "ext4"), (xfs, "xfs")):
            assert fs["blank"] is None and fs["probed"] == fstype, fs
            assert (fs["mounted"], fs["mounted_again"]) == (True, False), fs
            # The journal is dirty while mounted read-write, clean once unmounted.
            assert (fs["dirty_while_mounted"], fs["dirty_after"]) == (True, False), fs
            assert fs["ro_mounted"] and fs["read_back"], fs
            # ext4's noload shows as norecovery, like xfs's own option.
            assert "ro" in fs["ro_options"] and "norecovery" in fs["ro_options"], fs
            assert fs["ro_write"] == "Read-only file system", fs
            assert (fs["ro_unmounted"], fs["unmounted_again"]) == (True, False), fs
        for grown, before, after in ((ext4_grown, 0, 1), (xfs_grown, 1, 2)):
            assert grown["table_before"].split()[1] == str(sectors[before]), grown
            assert grown["table_after"].split()[1] == str(sectors[after]), grown
            assert grown["table_after"].split()[2:] == grown["table_before"].split()[2:]
            assert grown["fs_bytes"][1] > grown["fs_bytes"][0], grown
            assert grown["note"], grown

        gone = result(walk(lab, config, "teardown"), key)
        torn_down = True
        assert gone["removed"] == [True, False]
        assert gone["disconnected"] == [[True, True], [False, False]]
        assert gone["left"] == [[], []]
    finally:
        if not torn_down:  # unmounts, removes the stripe, disconnects: whatever is left
            walk(lab, config, "teardown", check=False)
        for spec, _, lv in SEGMENTS:
            unexport(lab, spec.name, lv)
    mib = [m * 2 for m in MIB]
    scenario.done(
        f"2 segments over NVMe/TCP (one with DH-HMAC-CHAP, key on no command line and never "
        f"logged) connected idempotently in {made['connect_seconds']} s, dm stripe grown "
        f"{mib[0]}->{mib[1]}->{mib[2]} MiB online; ext4 and xfs made, read back ro without "
        "replay, grown; torn down twice"
    )
