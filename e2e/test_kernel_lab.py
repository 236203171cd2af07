"""The kernel data path in the lab, end to end: nvmet exports over TCP and soft-RoCE,
LVM volumes, a device-mapper stripe over two storage VMs, native multipath through a link
cut, DH-HMAC-CHAP, and a storage VM pulled and rebooted. All I/O is checked with fio
--verify (checksums written, read back and compared)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    GPU0,
    LIB,
    MIB,
    STORAGE0,
    STORAGE1,
    WRONG_KEY_REFUSALS,
    Scenario,
    assert_verified,
    fio_result,
    retry_after_guest_panic,
    sh,
)

from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.netns import bridge_address
from flashmesh.lab.vm import Lab, LabError, VmDied, VmSpec, host_nqn

pytestmark = [pytest.mark.kernel, pytest.mark.second_lab]

# Not FlashMesh's NQN prefix: these hand-made exports are no business of its planner.
NQN = "nqn.2026-11.dev.lab:"


@pytest.fixture(autouse=True, scope="module")
def _exports_removed_at_the_end(lab: Lab) -> Iterator[None]:
    """The hand-made exports go when the module ends: the storage agents of later
    scenarios serve on the same addresses."""
    yield
    for vm in (STORAGE0.name, STORAGE1.name):
        with contextlib.suppress(LabError):
            sh(lab, vm, f"nvmet_clear {NQN}")


GPU = GPU0.name
# nvmet ports on storage-0: TCP on each link, RDMA on link 0; storage-1: TCP on link 0.
TCP0 = f"1 tcp {STORAGE0.address(0)} 4420"
TCP1 = f"2 tcp {STORAGE0.address(1)} 4420"
RDMA0 = f"3 rdma {STORAGE0.address(0)} 4421"
S1_TCP0 = f"1 tcp {STORAGE1.address(0)} 4420"
# The project's virtualenv (on Debian's python3, so pyverbs is visible) runs in the VMs too.
VENV_PYTHON = sys.executable


def local_drive(lab: Lab, vm: str, number: int) -> str:
    """The /dev path of a VM's emulated drive, found by the serial the lab gave it."""
    serial = lab.drive_serial(vm, number)
    return sh(lab, vm, f"drive_by_serial {serial}").strip()


# The drive of each storage VM that holds the hand-made volume group fmlab.
LVM_DRIVE = {STORAGE0.name: 2, STORAGE1.name: 0}


def lvm_volume(lab: Lab, vm: str, name: str, size: str) -> str:
    """An LVM logical volume in the VM's hand-made volume group (made once)."""
    drive = local_drive(lab, vm, LVM_DRIVE[vm])
    return sh(lab, vm, f"lvm_volume {drive} {name} {size}").strip()


def export(lab: Lab, vm: str, nqn: str, device: str, *ports: str) -> None:
    links = "\n".join(f"nvmet_port {port} {nqn}" for port in ports)
    sh(lab, vm, f"nvmet_subsystem {nqn} {device}\n{links}")


def connect(lab: Lab, transport: str, address: str, port: int, nqn: str, extra: str = "") -> str:
    """Connects the GPU VM to a subsystem; the block device it gets."""
    return sh(
        lab,
        GPU,
        f"modprobe nvme-{transport}\n"
        f"nvme connect -t {transport} -a {address} -s {port} -n {nqn} {extra}\n"
        f"nvme_device {nqn}",
    ).strip()


def disconnect(lab: Lab, nqn: str) -> None:
    sh(lab, GPU, f"nvme disconnect -n {nqn} || true")


def test_nvme_tcp_export_carries_verified_io(lab: Lab, scenario: Scenario) -> None:
    nqn = NQN + "tcp"
    export(lab, STORAGE0.name, nqn, local_drive(lab, STORAGE0.name, 0), TCP0)
    try:
        device = connect(lab, "tcp", STORAGE0.address(0), 4420, nqn)
        job = fio_result(sh(lab, GPU, f"fio_verify {device} 32M"))
        assert_verified(job, 32 * MIB)
    finally:
        disconnect(lab, nqn)
    scenario.done("32 MiB written and verified over NVMe/TCP")


def rdma_verified_io(lab: Lab, nqn: str) -> None:
    sh(lab, STORAGE0.name, "rxe_up eth0")
    sh(lab, GPU, "rxe_up eth0")
    export(lab, STORAGE0.name, nqn, local_drive(lab, STORAGE0.name, 1), RDMA0)
    try:
        device = connect(lab, "rdma", STORAGE0.address(0), 4421, nqn)
        transport = sh(lab, GPU, "cat /sys/class/nvme-subsystem/*/nvme*/transport | sort -u")
        assert transport.split() == ["rdma"]
        assert_verified(fio_result(sh(lab, GPU, f"fio_verify {device} 32M")), 32 * MIB)
    finally:
        with contextlib.suppress(VmDied):
            disconnect(lab, nqn)


def test_nvme_rdma_over_soft_roce_carries_verified_io(lab: Lab, scenario: Scenario) -> None:
    nqn = NQN + "rdma"
    _, note = retry_after_guest_panic(lab, lambda: rdma_verified_io(lab, nqn), "rdma_rxe")

    # pyverbs, from the project's own virtualenv inside the VM.
    found = json.loads(sh(lab, GPU, f"{VENV_PYTHON} -m flashmesh.dataplane.rdma"))
    (port,) = [p for p in found["ports"] if p["name"] == "rxe0"]
    assert (port["state"], port["linkLayer"], port["netdev"]) == ("ACTIVE", "Ethernet", "eth0")
    # The RoCEv2 GID carries the VM's fabric address (IPv4-mapped).
    assert str(ipaddress.IPv6Address(port["gid"]).ipv4_mapped) == GPU0.address(0)
    assert any(g["type"] == "RoCE v2" and g["gid"] == port["gid"] for g in port["gids"])
    scenario.done(f"32 MiB verified over NVMe/RDMA (rxe0); pyverbs sees rxe0 ACTIVE, RoCEv2{note}")


def test_lvm_volume_and_a_stripe_over_two_storage_vms(lab: Lab, scenario: Scenario) -> None:
    single, left, right = NQN + "lv", NQN + "stripe0", NQN + "stripe1"
    export(lab, STORAGE0.name, single, lvm_volume(lab, STORAGE0.name, "export", "96M"), TCP0)
    export(lab, STORAGE0.name, left, lvm_volume(lab, STORAGE0.name, "stripe", "64M"), TCP0)
    export(lab, STORAGE1.name, right, lvm_volume(lab, STORAGE1.name, "stripe", "64M"), S1_TCP0)
    try:
        device = connect(lab, "tcp", STORAGE0.address(0), 4420, single)
        assert_verified(fio_result(sh(lab, GPU, f"fio_verify {device} 32M")), 32 * MIB)

        a = connect(lab, "tcp", STORAGE0.address(0), 4420, left)
        b = connect(lab, "tcp", STORAGE1.address(0), 4420, right)
        # 2 x 64 MiB striped in 64 KiB chunks: 262144 sectors of 512 bytes.
        sh(lab, GPU, f"dmsetup create fmstripe --table '0 262144 striped 2 128 {a} 0 {b} 0'")
        table = sh(lab, GPU, "dmsetup table fmstripe").split()
        assert table[2:5] == ["striped", "2", "128"]
        # 48 MiB: 768 chunks, alternating between the two storage VMs.
        job = fio_result(sh(lab, GPU, "fio_verify /dev/mapper/fmstripe 48M"))
        assert_verified(job, 48 * MIB)
        # Both storage VMs carried data.
        for vm, nqn in ((STORAGE0.name, left), (STORAGE1.name, right)):
            written = sh(
                lab, vm, f"cat /sys/kernel/config/nvmet/subsystems/{nqn}/namespaces/1/device_path"
            )
            assert written.strip().startswith("/dev/")
    finally:
        sh(lab, GPU, "dmsetup remove fmstripe 2>/dev/null || true")
        for nqn in (single, left, right):
            disconnect(lab, nqn)
    scenario.done("LVM volume exported and verified; 48 MiB verified over a 2-VM dm stripe")


def test_multipath_survives_a_link_cut_without_a_verify_error(lab: Lab, scenario: Scenario) -> None:
    nqn = NQN + "mpath"
    export(lab, STORAGE0.name, nqn, lvm_volume(lab, STORAGE0.name, "mpath", "96M"), TCP0, TCP1)
    opts = "--ctrl-loss-tmo=60 --reconnect-delay=2"
    try:
        device = connect(lab, "tcp", STORAGE0.address(0), 4420, nqn, opts)
        assert connect(lab, "tcp", STORAGE0.address(1), 4420, nqn, opts) == device
        paths = sh(lab, GPU, f"path_states {nqn}")
        assert paths.split() == [f"{STORAGE0.address(0)}=live", f"{STORAGE0.address(1)}=live"]

        job = lab.spawn(GPU, f"source {LIB}\nfio_verify {device} 64M > /tmp/mpath.json")
        written = f"cat /sys/block/{device.removeprefix('/dev/')}/stat | awk '{{print $7}}'"
        assert processes.wait_until(lambda: int(sh(lab, GPU, written)) > 0, 120)
        lab.cut_link(STORAGE0.name, 0)
        try:
            # The kernel notices through keep-alive and error recovery, not at once.
            assert processes.wait_until(
                lambda: f"{STORAGE0.address(0)}=live" not in sh(lab, GPU, f"path_states {nqn}"),
                120,
            )
        finally:
            lab.restore_link(STORAGE0.name, 0)
        result = lab.wait(GPU, job, timeout=600)
        assert result.rc == 0, result.output
        job_json = fio_result(sh(lab, GPU, "cat /tmp/mpath.json"))
        assert_verified(job_json, 64 * MIB)
        stall = max(job_json["write"]["clat_ns"]["max"], job_json["read"]["clat_ns"]["max"]) / 1e9
        assert processes.wait_until(
            lambda: (
                sh(lab, GPU, f"path_states {nqn}").split().count(f"{STORAGE0.address(0)}=live") == 1
            ),
            120,
        ), "the cut path did not come back"
    finally:
        disconnect(lab, nqn)
    scenario.done(
        f"link 0 cut under fio --verify: 0 verify errors, longest I/O stall {stall:.1f} s"
    )


def test_dh_hmac_chap_admits_the_right_key_only(lab: Lab, scenario: Scenario) -> None:
    nqn = NQN + "auth"
    host = host_nqn(GPU)
    assert sh(lab, GPU, "cat /etc/nvme/hostnqn").strip() == host
    key = sh(lab, STORAGE0.name, f"nvme gen-dhchap-key -n {host}").strip()
    wrong = sh(lab, STORAGE0.name, f"nvme gen-dhchap-key -n {host}").strip()
    assert key.startswith("DHHC-1:") and key != wrong
    sh(
        lab,
        STORAGE0.name,
        f"nvmet_subsystem {nqn} {lvm_volume(lab, STORAGE0.name, 'auth', '64M')} 0\n"
        f"nvmet_allow_host {nqn} {host} '{key}'\n"
        f"nvmet_port {TCP0} {nqn}",
    )
    base = f"modprobe nvme-tcp\nnvme connect -t tcp -a {STORAGE0.address(0)} -s 4420 -n {nqn}"
    try:
        refused_wrong = lab.exec(GPU, f"{base} --dhchap-secret='{wrong}'", check=False)
        refused_none = lab.exec(GPU, base, check=False)
        assert refused_wrong.rc != 0 and any(m in refused_wrong.output for m in WRONG_KEY_REFUSALS)
        assert refused_none.rc != 0 and "Required key not available" in refused_none.output
        no_device = lab.exec(GPU, f"source {LIB}\nnvme_device {nqn} 1", check=False)
        assert no_device.rc != 0, no_device.output

        device = connect(lab, "tcp", STORAGE0.address(0), 4420, nqn, f"--dhchap-secret='{key}'")
        assert_verified(fio_result(sh(lab, GPU, f"fio_verify {device} 32M")), 32 * MIB)
        dmesg = sh(lab, GPU, "dmesg | grep -c 'authenticated with hash' || true")
        assert int(dmesg) >= 1
    finally:
        disconnect(lab, nqn)
    scenario.done("DH-HMAC-CHAP: wrong key and no key refused, right key verified")


def test_a_pulled_storage_vm_reboots_as_the_same_node_with_its_data(
    lab: Lab, scenario: Scenario
) -> None:
    vm = STORAGE1.name
    volume = lvm_volume(lab, vm, "persist", "32M")
    checksum = sh(
        lab,
        vm,
        f"dd if=/dev/urandom of={volume} bs=1M count=16 oflag=direct status=none\n"
        f"head -c 16M {volume} | sha256sum",
    ).split()[0]
    nqn_before = sh(lab, vm, "cat /etc/nvme/hostnqn").strip()
    assert nqn_before == host_nqn(vm)

    lab.kill(vm)
    lab.restart(vm)

    assert sh(lab, vm, "cat /etc/nvme/hostnqn").strip() == nqn_before
    after = sh(lab, vm, f"vgchange -ay fmlab >/dev/null\nhead -c 16M {volume} | sha256sum")
    assert after.split()[0] == checksum
    scenario.done("storage-1 killed and restarted: same host NQN, 16 MiB checksum intact")


def test_three_vms_are_torn_down_leaving_nothing(tmp_path: Path, scenario: Scenario) -> None:
    lab = Lab(tmp_path / "teardown")  # its own namespace, beside the session's
    try:
        lab.up([VmSpec(f"bare-{i}", 10 + i) for i in range(3)])
        for i in range(3):
            assert lab.exec(f"bare-{i}", "hostname").output.strip() == f"bare-{i}"
        assert len(lab.leftovers()) > 0  # what the check below would find if left running
    finally:
        lab.down()
    assert lab.leftovers() == []
    scenario.done("3 VMs booted and torn down: no VM, tap, namespace, mount or folder left")


def test_vms_reach_the_control_plane_on_the_bridge(
    lab: Lab, cluster: LocalCluster, scenario: Scenario
) -> None:
    """Agents and node plugins in the VMs will talk to the same kube-apiserver as the tests:
    it serves the bridge address with a certificate that names it."""
    ca = (cluster.pki / "ca.crt").read_text()
    url = f"https://{bridge_address(0)}:{cluster.state.ports['apiserver']}/readyz"
    out = sh(lab, GPU, f"cat > /tmp/ca.crt <<'EOF'\n{ca}EOF\ncurl -sS --cacert /tmp/ca.crt {url}")
    assert out.strip() == "ok"
    scenario.done(f"gpu-0 reached kube-apiserver at {url} with TLS verified")


def test_a_guest_kernel_panic_is_retried_once_and_said(lab: Lab, scenario: Scenario) -> None:
    """The retry the RDMA scenario relies on, with a panic made on purpose (sysrq)."""
    calls = []

    def attempt() -> str:
        calls.append(len(calls))
        if len(calls) == 1:
            lab.exec(GPU, "echo 1 > /proc/sys/kernel/sysrq\necho c > /proc/sysrq-trigger", 120)
        return sh(lab, GPU, "hostname").strip()

    result, note = retry_after_guest_panic(lab, attempt, "sysrq")
    assert (result, len(calls)) == (GPU, 2)
    assert note == f"; {GPU}'s kernel panicked in sysrq, retries: 1"
    scenario.done(f"a panicked {GPU} was booted again and the attempt retried once")


# Four 16 MiB device-mapper devices over one loop device, two named as FlashMesh names its
# devices (fm-...) and two not; on each pair, a degraded RAID1 and an LVM volume group.
UDEV_DEVICES = """
modprobe loop
truncate -s 72M /run/udev-test.img
loop=$(losetup -f --show /run/udev-test.img)
i=0
for name in fm-udev-md lab-udev-md fm-udev-lvm lab-udev-lvm; do
  dmsetup create $name --table "0 32768 linear $loop $((2048 + i * 32768))"; i=$((i + 1))
done
udevadm settle
for kind in fm lab; do
  mdadm --create /dev/md/$kind-udev --run --quiet --level=1 --raid-devices=2 \\
    --metadata=1.2 --bitmap=none /dev/mapper/$kind-udev-md missing 2>/dev/null
  udevadm settle
  mdadm --stop --quiet /dev/md/$kind-udev
  udevadm settle
  vgcreate --quiet ${kind}udevvg /dev/mapper/$kind-udev-lvm >/dev/null
  lvcreate --quiet -L 4M -n lv ${kind}udevvg >/dev/null
  vgchange --quiet -an ${kind}udevvg >/dev/null
done
# They disappear and come back, as a leg does when its path returns or a node reboots.
for name in fm-udev-md lab-udev-md fm-udev-lvm lab-udev-lvm; do dmsetup remove $name; done
udevadm settle
rm -f /run/lvm/pvs_online/* /run/lvm/vgs_online/*
i=0
for name in fm-udev-md lab-udev-md fm-udev-lvm lab-udev-lvm; do
  dmsetup create $name --table "0 32768 linear $loop $((2048 + i * 32768))"; i=$((i + 1))
done
udevadm settle
"""
# What holds each device now: an md array the host's udev assembled, an LV it activated.
UDEV_HOLDERS = """
for name in fm-udev-md lab-udev-md fm-udev-lvm lab-udev-lvm; do
  echo "$name $(ls /sys/block/$(basename $(readlink -f /dev/mapper/$name))/holders | wc -l)"
done
"""
UDEV_CLEANUP = """
for name in fm-udev-md lab-udev-md fm-udev-lvm lab-udev-lvm; do
  dev=$(basename $(readlink -f /dev/mapper/$name) 2>/dev/null) || continue
  for md in /sys/block/$dev/holders/md*; do
    [ -e "$md" ] && mdadm --stop --quiet /dev/${md##*/}
  done
done
vgchange --quiet -an fmudevvg labudevvg >/dev/null 2>&1
for name in fm-udev-md lab-udev-md fm-udev-lvm lab-udev-lvm; do dmsetup remove $name; done
losetup -j /run/udev-test.img | cut -d: -f1 | xargs -r losetup -d
rm -f /run/udev-test.img /etc/udev/rules.d/RULE_NAME
udevadm control --reload
"""


def test_the_hosts_udev_assembles_and_activates_nothing_of_flashmeshs(
    lab: Lab, scenario: Scenario
) -> None:
    """The VMs run udev with Debian's rules, which start md arrays (mdadm --incremental)
    and activate LVM volume groups (autoactivation) on every device that shows them. With
    FlashMesh's rule, its devices are left alone; the same content on a device that is not
    FlashMesh's is taken as before (so the rule is what makes the difference)."""
    from flashmesh.dataplane import udev

    sh(lab, GPU, f"cat > /etc/udev/rules.d/{udev.RULES_NAME} <<'RULES'\n{udev.RULES}RULES\n"
                 "udevadm control --reload")  # fmt: skip
    try:
        sh(lab, GPU, UDEV_DEVICES, timeout=300)
        held = dict(line.split() for line in sh(lab, GPU, UDEV_HOLDERS).strip().splitlines())
        active = sh(lab, GPU, "lvs --noheadings -o vg_name,lv_active fmudevvg labudevvg")
    finally:
        lab.exec(GPU, UDEV_CLEANUP.replace("RULE_NAME", udev.RULES_NAME), check=False)
    assert held == {"fm-udev-md": "0", "lab-udev-md": "1", "fm-udev-lvm": "0",
                    "lab-udev-lvm": "1"}, (held, active)  # fmt: skip
    assert sorted(active.split()) == sorted(["fmudevvg", "labudevvg", "active"]), active
    scenario.done(
        "udev with Debian's rules: an md member and an LVM PV named as FlashMesh's devices "
        "stayed unclaimed, the same on other devices were assembled and activated"
    )
