"""LVM on a storage node: one volume group per pool over the drives it selected, a thin
pool in it (so segments can be snapshotted and cloned at once, and new blocks are zeroed),
and one thin logical volume per segment. State is read from lvm2's JSON reports; every
operation is idempotent, so a restarted agent finds what it made and goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flashmesh.core.naming import lv_device
from flashmesh.dataplane import faults, process
from flashmesh.dataplane.process import CommandError, Runner

THIN_POOL = "thin"
# The thin pool takes this share of the volume group; the rest leaves room for its
# metadata to grow and for lvm2's spare metadata volume.
THIN_POOL_SHARE = "95%FREE"
_REPORT = ("--reportformat", "json", "--units", "b", "--nosuffix")
_LV_FIELDS = (
    "lv_name,vg_name,lv_size,lv_attr,pool_lv,origin,data_percent,metadata_percent,segtype,"
    "vg_size,vg_free"
)
# The commands that only read; every other one changes the node.
_READS = frozenset({"pvs", "vgs", "lvs"})


class LvmError(RuntimeError):
    pass


@dataclass(frozen=True)
class PhysicalVolume:
    path: str
    volume_group: str
    size: int


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    size: int
    free: int


@dataclass(frozen=True)
class LogicalVolume:
    name: str
    volume_group: str
    size: int
    attr: str
    pool: str
    origin: str
    data_percent: float | None
    metadata_percent: float | None
    segtype: str

    @property
    def active(self) -> bool:
        return len(self.attr) > 4 and self.attr[4] == "a"

    @property
    def device(self) -> str:
        return lv_device(self.volume_group, self.name)


def parse_report(text: str, kind: str) -> list[dict[str, str]]:
    """The rows of an lvm2 JSON report (`kind` is pv, vg or lv)."""
    rows: list[dict[str, str]] = []
    for report in json.loads(text).get("report", []):
        rows += report.get(kind, [])
    return rows


def _percent(value: str) -> float | None:
    return float(value) if value else None


def physical_volumes(text: str) -> list[PhysicalVolume]:
    return [
        PhysicalVolume(r["pv_name"], r["vg_name"], int(r["pv_size"]))
        for r in parse_report(text, "pv")
    ]


def volume_groups(text: str) -> list[VolumeGroup]:
    return [
        VolumeGroup(r["vg_name"], int(r["vg_size"]), int(r["vg_free"]))
        for r in parse_report(text, "vg")
    ]


def logical_volumes(text: str) -> list[LogicalVolume]:
    return [
        LogicalVolume(
            name=r["lv_name"],
            volume_group=r["vg_name"],
            size=int(r["lv_size"]),
            attr=r["lv_attr"],
            pool=r["pool_lv"],
            origin=r["origin"],
            data_percent=_percent(r["data_percent"]),
            metadata_percent=_percent(r["metadata_percent"]),
            segtype=r["segtype"],
        )
        for r in parse_report(text, "lv")
        if not r["lv_name"].startswith("[")  # lvm2's hidden internal volumes
    ]


class Lvm:
    """lvm2 commands over an injected runner.

    Reports are kept until this object changes something: an agent makes one Lvm per pass,
    so a pass scans the devices once (each lvm2 command scans them, slowly) instead of once
    per segment, and still sees its own changes."""

    def __init__(self, runner: Runner = process.run) -> None:
        self.runner = runner
        self._reports: dict[tuple[str, ...], str] = {}

    def _run(self, *argv: str) -> str:
        if argv[0] in _READS and argv in self._reports:
            return self._reports[argv]
        if argv[0] not in _READS:
            faults.before_change(" ".join(argv))
            self._reports.clear()
            if faults.failing(" ".join(argv)):
                raise LvmError(f"{' '.join(argv)}: failed (injected by {faults.FAIL_ENV})")
        try:
            out = process.check(self.runner, argv).stdout
        except CommandError as exc:
            raise LvmError(str(exc)) from exc
        if argv[0] in _READS:
            self._reports[argv] = out
        return out

    # --- reading ---------------------------------------------------------------------

    def physical_volumes(self) -> list[PhysicalVolume]:
        return physical_volumes(self._run("pvs", *_REPORT, "-o", "pv_name,vg_name,pv_size"))

    def _lv_report(self, vg: str) -> str | None:
        """One `lvs` of the group, with the group's size and free space on every row (each
        lvm2 command scans every device, which takes a second under emulation); None when
        the group does not exist."""
        argv = ("lvs", *_REPORT, "-a", "-o", _LV_FIELDS, vg)
        if argv not in self._reports:
            result = self.runner(argv)
            if result.rc != 0:
                if "not found" not in result.stderr:
                    raise LvmError(str(CommandError(result)))
                self._reports[argv] = ""
            else:
                self._reports[argv] = result.stdout
        return self._reports[argv] or None

    def volume_group(self, vg: str) -> VolumeGroup | None:
        text = self._lv_report(vg)
        if text is None:
            return None
        rows = parse_report(text, "lv")
        if rows:
            return VolumeGroup(vg, int(rows[0]["vg_size"]), int(rows[0]["vg_free"]))
        out = self._run("vgs", *_REPORT, "-o", "vg_name,vg_size,vg_free", vg)  # no volumes yet
        return next((g for g in volume_groups(out) if g.name == vg), None)

    def logical_volumes(self, vg: str) -> list[LogicalVolume]:
        text = self._lv_report(vg)
        return logical_volumes(text) if text else []

    def logical_volume(self, vg: str, name: str) -> LogicalVolume | None:
        return next((lv for lv in self.logical_volumes(vg) if lv.name == name), None)

    # --- the volume group and its thin pool ---------------------------------------------

    def ensure_volume_group(
        self, vg: str, devices: list[str], members: set[str] | None = None
    ) -> None:
        """The volume group over these devices: made, or extended by new ones; activated.
        members: the devices already in it, when the caller knows them (from its inventory)."""
        if members is None:
            members = {pv.path for pv in self.physical_volumes() if pv.volume_group == vg}
        new = [d for d in devices if d not in members]
        # No --yes: it would answer lvm2's "signature detected, wipe it?" for us. Selection
        # passes only drives blkid calls blank; should one hold something after all, lvm2
        # asks, finds no terminal, and refuses.
        if self.volume_group(vg) is None:
            if not new:
                raise LvmError(f"volume group {vg} needs at least one drive")
            # Not autoactivated by the host at boot: the agent activates it itself, after
            # installing the udev rule that keeps the host's md and LVM off its volumes
            # (activated before, a mirror leg would be grabbed by an md127 on the host).
            self._run("vgcreate", "--setautoactivation", "n", vg, *new)
        elif new:
            self._run("vgextend", vg, *new)
        # After a reboot its volumes are inactive: activate them (once, not every pass).
        if not all(lv.active for lv in self.logical_volumes(vg) if not lv.name.startswith("[")):
            self._run("vgchange", "--activate", "y", vg)

    def ensure_thin_pool(self, vg: str) -> LogicalVolume:
        if self.logical_volume(vg, THIN_POOL) is None:
            self._run("lvcreate", "--yes", "--type", "thin-pool", "--zero", "y",
                      "--extents", THIN_POOL_SHARE, "--name", THIN_POOL, vg)  # fmt: skip
        return self._existing(vg, THIN_POOL)

    # --- segments ----------------------------------------------------------------------

    def ensure_volume(
        self, vg: str, name: str, size: int, origin: str | None = None
    ) -> LogicalVolume:
        """A thin volume of at least `size` bytes: made (empty, or as a writable thin
        snapshot of `origin`, a copy that shares its blocks), or grown; never shrunk."""
        lv = self.logical_volume(vg, name)
        if lv is None and origin is not None:
            if self.logical_volume(vg, origin) is None:
                raise LvmError(f"cannot copy {vg}/{origin}: it does not exist")
            self._run("lvcreate", "--yes", "--snapshot", "--setactivationskip", "n",
                      "--name", name, f"{vg}/{origin}")  # fmt: skip
            lv = self._existing(vg, name)
        if lv is None:
            self._run("lvcreate", "--yes", "--thin", "--virtualsize", f"{size}b",
                      "--name", name, f"{vg}/{THIN_POOL}")  # fmt: skip
        elif lv.size < size:
            self._run("lvextend", "--yes", "--size", f"{size}b", f"{vg}/{name}")
        elif not lv.active:
            self._run("lvchange", "--activate", "y", f"{vg}/{name}")
        return self._existing(vg, name)

    def ensure_snapshot(self, vg: str, origin: str, name: str) -> LogicalVolume:
        """A thin snapshot of a volume, activated (thin snapshots skip activation by
        default, -kn turns that off)."""
        if self.logical_volume(vg, name) is None:
            if self.logical_volume(vg, origin) is None:
                raise LvmError(f"cannot snapshot {vg}/{origin}: it does not exist")
            self._run("lvcreate", "--yes", "--snapshot", "--setactivationskip", "n",
                      "--name", name, f"{vg}/{origin}")  # fmt: skip
        return self._existing(vg, name)

    def _existing(self, vg: str, name: str) -> LogicalVolume:
        lv = self.logical_volume(vg, name)
        if lv is None:
            raise LvmError(f"{vg}/{name} missing after creation")
        return lv

    def remove_volume(self, vg: str, name: str) -> bool:
        """Removes a volume; False when it was already gone."""
        if self.logical_volume(vg, name) is None:
            return False
        self._run("lvremove", "--yes", f"{vg}/{name}")
        return True

    def allocated(self, vg: str) -> int:
        """The virtual size of every thin volume in the pool: what the pool has promised,
        which placement must keep within the pool's size."""
        return sum(lv.size for lv in self.logical_volumes(vg) if lv.pool == THIN_POOL)
