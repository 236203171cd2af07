"""Runs inside a GPU VM: FlashMesh's host side with the real runner, one step at a time (the
test grows the logical volumes on the storage VMs between steps). Prints what it saw as
JSON on stdout; FlashMesh's command log goes to stderr, so the test can check that no key
reached it.

    python initiator_walk.py STEP CONFIG_JSON [FSTYPE] [SEGMENT_MIB]

STEP: assemble | fs | grow | teardown. CONFIG_JSON: {"hostnqn", "hostid", "name",
"segment_mib", "mount", "segments": [{"nqn", "traddr", "trsvcid", "key"?}]}.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from flashmesh.dataplane import assembly, filesystem, process
from flashmesh.dataplane.initiator import nvme, sysfs
from flashmesh.dataplane.initiator.nvme import ConnectOptions

CHUNK = 128  # 64 KiB
MIB_SECTORS = 2048
RUN = process.run


def options(config: dict[str, Any], segment: dict[str, str]) -> ConnectOptions:
    return ConnectOptions(
        transport="tcp",
        traddr=segment["traddr"],
        trsvcid=segment["trsvcid"],
        nqn=segment["nqn"],
        hostnqn=config["hostnqn"],
        hostid=config["hostid"],
        ctrl_loss_tmo=30,
        reconnect_delay=2,
        keep_alive_tmo=5,
        fast_io_fail_tmo=5,
        dhchap_secret=segment.get("key"),
    )


def controllers(nqn: str) -> list[str]:
    found = sysfs.find_subsystem(nqn)
    return [c.name for c in found.controllers] if found else []


def attribute(nqn: str, name: str) -> str:
    controller = controllers(nqn)[0]
    return sysfs.controller_attribute(controller, name).read_text().strip()


def assemble(config: dict[str, Any]) -> dict[str, Any]:
    begin = time.monotonic()
    devices = [nvme.connect(RUN, options(config, s)) for s in config["segments"]]
    connected = time.monotonic() - begin
    again = [nvme.connect(RUN, options(config, s)) for s in config["segments"]]
    nqns = [s["nqn"] for s in config["segments"]]
    sectors = config["segment_mib"] * MIB_SECTORS
    path = assembly.ensure_striped(RUN, config["name"], devices, sectors, CHUNK)
    table = assembly.current_table(RUN, config["name"])
    assembly.ensure_striped(RUN, config["name"], devices, sectors, CHUNK)
    return {
        "devices": devices,
        "again": again,
        "controllers": [controllers(n) for n in nqns],
        "paths": [sysfs.path_states(n) for n in nqns],
        "timeouts": [
            {k: attribute(n, k) for k in ("fast_io_fail_tmo", "ctrl_loss_tmo", "kato")}
            for n in nqns
        ],
        "sectors": [sysfs.block_sectors(d) for d in devices],
        "path": path,
        "table": table,
        "table_again": assembly.current_table(RUN, config["name"]),
        "expected": assembly.striped_table(devices, sectors, CHUNK),
        "connect_seconds": round(connected, 1),
    }


def fs(config: dict[str, Any], fstype: str) -> dict[str, Any]:
    device, target = f"/dev/mapper/{config['name']}", config["mount"]
    note = Path(target) / "note.txt"
    if fstype == "xfs":  # the ext4 from the step before goes: make() refuses to format over it
        try:
            filesystem.make(RUN, device, fstype)
            refused = ""
        except filesystem.FilesystemError as exc:
            refused = str(exc)
        process.check(RUN, ["wipefs", "-q", "-a", device])
    else:
        refused = ""
    out: dict[str, Any] = {"refused": refused, "blank": filesystem.probe(RUN, device)}
    filesystem.make(RUN, device, fstype)
    out["probed"] = filesystem.probe(RUN, device)
    out["mounted"] = filesystem.mount(RUN, device, target, fstype)
    out["mounted_again"] = filesystem.mount(RUN, device, target, fstype)
    text = f"written through {fstype} on {device} at {time.time()}"
    with note.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    out["dirty_while_mounted"] = filesystem.needs_recovery(RUN, device, fstype)
    out["unmounted"] = filesystem.unmount(RUN, target)
    out["dirty_after"] = filesystem.needs_recovery(RUN, device, fstype)
    ro = filesystem.readonly_options(fstype)
    out["ro_mounted"] = filesystem.mount(RUN, device, target, fstype, ro)
    seen = filesystem.mounted_at(target)
    out["ro_options"] = list(seen.options + seen.super_options) if seen else []
    out["read_back"] = note.read_text() == text
    try:
        (Path(target) / "other").write_text("x")
        out["ro_write"] = "allowed"
    except OSError as exc:
        out["ro_write"] = exc.strerror
    out["ro_unmounted"] = filesystem.unmount(RUN, target)
    out["unmounted_again"] = filesystem.unmount(RUN, target)
    return out


def wait_sectors(device: str, sectors: int, timeout: float = 60) -> float:
    """Seconds until the kernel shows the device at least this long."""
    begin = time.monotonic()
    while (sysfs.block_sectors(device) or 0) < sectors:
        if time.monotonic() - begin > timeout:
            raise TimeoutError(f"{device} still {sysfs.block_sectors(device)} sectors")
        time.sleep(0.2)
    return round(time.monotonic() - begin, 1)


def grow(config: dict[str, Any], fstype: str, segment_mib: int) -> dict[str, Any]:
    device, target = f"/dev/mapper/{config['name']}", config["mount"]
    sectors = segment_mib * MIB_SECTORS
    devices = [sysfs.namespace_device(s["nqn"]) or "" for s in config["segments"]]
    before = assembly.current_table(RUN, config["name"])
    rescanned = [nvme.rescan(RUN, s["nqn"]) for s in config["segments"]]
    waited = [wait_sectors(d, sectors) for d in devices]
    filesystem.mount(RUN, device, target, fstype)
    size_before = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    assembly.ensure_striped(RUN, config["name"], devices, sectors, CHUNK)
    filesystem.grow(RUN, device, target, fstype)
    stat = os.statvfs(target)
    out = {
        "rescanned": rescanned,
        "waited": waited,
        "table_before": before,
        "table_after": assembly.current_table(RUN, config["name"]),
        "fs_bytes": [size_before, stat.f_blocks * stat.f_frsize],
        "note": (Path(target) / "note.txt").read_text().startswith(f"written through {fstype}"),
    }
    filesystem.unmount(RUN, target)
    return out


def teardown(config: dict[str, Any]) -> dict[str, Any]:
    nqns = [s["nqn"] for s in config["segments"]]
    unmounted = filesystem.unmount(RUN, config["mount"])
    removed = [assembly.remove(RUN, config["name"]) for _ in range(2)]
    disconnected = [[nvme.disconnect(RUN, n) for n in nqns] for _ in range(2)]
    return {
        "unmounted": unmounted,
        "removed": removed,
        "disconnected": disconnected,
        "left": [controllers(n) for n in nqns],
    }


def main(step: str, config_json: str, *args: str) -> None:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="log: %(message)s")
    config = json.loads(config_json)
    begin = time.monotonic()
    if step == "assemble":
        out = assemble(config)
    elif step == "fs":
        out = fs(config, args[0])
    elif step == "grow":
        out = grow(config, args[0], int(args[1]))
    elif step == "teardown":
        out = teardown(config)
    else:
        raise SystemExit(f"unknown step {step}")
    out["seconds"] = round(time.monotonic() - begin, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
