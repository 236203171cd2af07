"""The node's NVMe host identity: the host's own /etc/nvme pair where it has a valid one, the
SMBIOS-derived pair otherwise, and never a host ID the kernel refuses for the NQN."""

from __future__ import annotations

from pathlib import Path

import pytest

from flashmesh.dataplane.identity import (
    IdentityError,
    host_id_now,
    host_identity,
    kept_identity,
)

SMBIOS = "4C4C4544-0042-3510-8052-B4C04F4E4D32"
DERIVED = f"nqn.2014-08.org.nvmexpress:uuid:{SMBIOS.lower()}"
RANDOM_ID = "8590f8cf-31c1-4bee-9572-8d457b808130"


def machine(tmp_path: Path, hostnqn: str | None = None, hostid: str | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "product_uuid").write_text(SMBIOS + "\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "nvme").mkdir()
    for name, value in (("hostnqn", hostnqn), ("hostid", hostid)):
        if value is not None:
            (tmp_path / "etc" / name).write_text(value + "\n")
    return tmp_path


def identity(root: Path) -> tuple[str, str]:
    found = host_identity(root / "product_uuid", root / "etc", root / "nvme")
    return found.nqn, found.hostid


def test_the_hosts_own_pair_is_reused_as_debian_writes_it(tmp_path: Path) -> None:
    """Debian's nvme-cli writes gen-hostnqn's NQN (from the SMBIOS UUID) and a random host
    ID: FlashMesh connects with that pair, the one the host's other tools connect with."""
    root = machine(tmp_path, DERIVED, RANDOM_ID)
    assert identity(root) == (DERIVED, RANDOM_ID)


def test_a_uuid_hostnqn_alone_carries_its_host_id(tmp_path: Path) -> None:
    nqn = "nqn.2014-08.org.nvmexpress:uuid:97745041-d4ca-4361-a4d8-5a7f806e5cee"
    assert identity(machine(tmp_path, nqn)) == (nqn, "97745041-d4ca-4361-a4d8-5a7f806e5cee")


@pytest.mark.parametrize(
    ("hostnqn", "hostid"),
    [
        (None, None),
        ("", RANDOM_ID),
        ("not an nqn", RANDOM_ID),
        ("nqn.2024-01.io.example:" + "x" * 220, RANDOM_ID),
        ("nqn.2024-01.io.example:gpu-7", "not-a-uuid"),
        ("nqn.2024-01.io.example:gpu-7", None),
    ],
    ids=["none", "empty", "not an NQN", "too long", "bad host ID", "no host ID"],
)
def test_without_a_valid_pair_the_smbios_one_is_derived(
    tmp_path: Path, hostnqn: str | None, hostid: str | None
) -> None:
    assert identity(machine(tmp_path, hostnqn, hostid)) == (DERIVED, SMBIOS.lower())


def test_the_host_id_the_kernel_pairs_with_the_nqn_wins(tmp_path: Path) -> None:
    """Another tool connected with the NQN and its own host ID: the kernel refuses any other
    host ID for that NQN (EINVAL), so FlashMesh takes the kernel's."""
    root = machine(tmp_path)
    ctrl = root / "nvme" / "nvme3"
    ctrl.mkdir()
    (ctrl / "hostnqn").write_text(DERIVED + "\n")
    (ctrl / "hostid").write_text(RANDOM_ID + "\n")
    other = root / "nvme" / "nvme0"  # a local PCIe drive: no hostnqn
    other.mkdir()
    assert identity(root) == (DERIVED, RANDOM_ID)


def test_no_identity_at_all_is_an_error_naming_both_sources(tmp_path: Path) -> None:
    root = machine(tmp_path)
    (root / "product_uuid").unlink()
    with pytest.raises(IdentityError, match=r"product_uuid.*/etc/nvme"):
        identity(root)


def kept(root: Path, upgraded: bool = False) -> tuple[str, str]:
    found = kept_identity(
        root / "state" / "identity.json", upgraded, root / "product_uuid", root / "etc",
        root / "nvme",
    )  # fmt: skip
    return found.nqn, found.hostid


def test_the_node_keeps_the_identity_it_started_with(tmp_path: Path) -> None:
    """A CSI node ID must not change while volumes are published to it: /etc/nvme edited
    (or made) later changes nothing."""
    root = machine(tmp_path)
    assert kept(root) == (DERIVED, SMBIOS.lower())
    other = "nqn.2014-08.org.nvmexpress:uuid:97745041-d4ca-4361-a4d8-5a7f806e5cee"
    (root / "etc" / "hostnqn").write_text(other + "\n")
    (root / "etc" / "hostid").write_text(RANDOM_ID + "\n")
    assert kept(root) == (DERIVED, SMBIOS.lower())


def test_a_node_upgraded_with_volumes_staged_keeps_its_smbios_nqn(tmp_path: Path) -> None:
    """Before /etc/nvme was read the NQN came from the SMBIOS UUID alone: a node with
    volumes staged keeps it, whatever /etc/nvme says."""
    other = "nqn.2014-08.org.nvmexpress:uuid:97745041-d4ca-4361-a4d8-5a7f806e5cee"
    root = machine(tmp_path, other, RANDOM_ID)
    assert kept(root, upgraded=True) == (DERIVED, SMBIOS.lower())
    fresh = machine(tmp_path / "fresh", other, RANDOM_ID)
    assert kept(fresh) == (other, RANDOM_ID)


def test_each_connect_takes_the_host_id_the_host_uses_now(tmp_path: Path) -> None:
    """/etc/nvme written after the node plugin started, or another tool connected with the
    NQN: the next connect pairs the NQN as they do (the kernel refuses two host IDs)."""
    root = machine(tmp_path)
    chosen = SMBIOS.lower()
    assert host_id_now(DERIVED, chosen, root / "etc", root / "nvme") == chosen
    (root / "etc" / "hostnqn").write_text(DERIVED + "\n")
    (root / "etc" / "hostid").write_text(RANDOM_ID + "\n")
    assert host_id_now(DERIVED, chosen, root / "etc", root / "nvme") == RANDOM_ID
    ctrl = root / "nvme" / "nvme2"
    ctrl.mkdir()
    (ctrl / "hostnqn").write_text(DERIVED + "\n")
    (ctrl / "hostid").write_text(chosen + "\n")
    assert host_id_now(DERIVED, chosen, root / "etc", root / "nvme") == chosen
