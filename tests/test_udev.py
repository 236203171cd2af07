"""FlashMesh's udev rule: installed where the host's udev reads it, once, and matching what
FlashMesh makes (the lab checks it against the real udev, e2e/test_kernel_lab.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flashmesh.core import naming
from flashmesh.dataplane import udev
from flashmesh.dataplane.process import Result


def no_commands(argv: Sequence[str], *, secrets: Sequence[str] = ()) -> Result:
    raise AssertionError(f"ran {list(argv)}")


def test_the_rule_is_written_once_and_left_alone_when_unchanged(tmp_path: Path) -> None:
    assert udev.install_rules(tmp_path, no_commands)
    written = (tmp_path / udev.RULES_NAME).read_text()
    assert written == udev.RULES
    assert not udev.install_rules(tmp_path, no_commands)
    (tmp_path / udev.RULES_NAME).write_text("# an older version\n")
    assert udev.install_rules(tmp_path, no_commands)
    assert (tmp_path / udev.RULES_NAME).read_text() == udev.RULES
    assert sorted(p.name for p in tmp_path.iterdir()) == [udev.RULES_NAME]


def test_a_host_without_udev_gets_nothing(tmp_path: Path) -> None:
    assert not udev.install_rules(tmp_path / "absent", no_commands)
    assert not (tmp_path / "absent").exists()


def test_the_rule_runs_between_the_probes_and_mds_and_lvms_rules() -> None:
    """After 60-persistent-storage (ID_FS_TYPE) and 63-md-raid-arrays (MD_DEVNAME), before
    64-md-raid-assembly (mdadm --incremental) and 69-lvm (autoactivation)."""
    order = sorted(
        [udev.RULES_NAME, "60-persistent-storage.rules", "63-md-raid-arrays.rules",
         "64-md-raid-assembly.rules", "69-lvm.rules"]
    )  # fmt: skip
    assert order.index(udev.RULES_NAME) == 2
    assert f'ATTRS{{subsysnqn}}=="{naming.NQN_PREFIX}*"' in udev.RULES
    vg_dm_name = naming.pool_volume_group("fast").replace("-", "--")
    assert vg_dm_name.startswith("flashmesh--") and naming.volume_id("pvc-x").startswith("fm-")
