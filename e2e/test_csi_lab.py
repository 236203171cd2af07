"""The CSI driver's calls made directly, as a CO would, in the lab: a striped volume written
on GPU-0, then mounted read-only on GPU-0 and GPU-1 at once, both reading back the same
bytes; with DH-HMAC-CHAP on, the node's key attaches the volume and a wrong key is refused
by the target kernel."""

from __future__ import annotations

import base64
import contextlib
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from agents import API, NAMESPACE, POOL, agent_log, node_name
from csi import controller, controller_log, controller_stub, node_log, node_stub, start_node_plugin
from helpers import (
    GPU0,
    GPU1,
    STORAGE0,
    STORAGE1,
    WRONG_KEY_REFUSALS,
    Scenario,
    retry_after_guest_panic,
    sh,
)

from flashmesh.csi_driver import fabric_paths
from flashmesh.csi_driver._proto import csi_pb2
from flashmesh.dataplane.host_keys import HOST_NQN_ANNOTATION, KEY_LABEL
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.vm import Lab, VmDied, host_nqn

pytestmark = pytest.mark.kernel

Mode = csi_pb2.VolumeCapability.AccessMode
GPUS = (GPU0, GPU1)


@dataclass
class Driver:
    controller: Any
    nodes: dict[str, Any]


@pytest.fixture(scope="module")
def driver(lab: Lab, agents: LocalCluster) -> Iterator[Driver]:
    with controller(lab, agents) as address:
        for gpu in GPUS:
            start_node_plugin(lab, agents, gpu.name)
        yield Driver(controller_stub(address), {g.name: node_stub(g.address(0)) for g in GPUS})


def mount_cap(mode: int) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


def block_cap(mode: int) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


def create(
    driver: Driver,
    name: str,
    stripes: int = 2,
    caps: list[csi_pb2.VolumeCapability] | None = None,
) -> csi_pb2.Volume:
    request = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=64 << 20),
        volume_capabilities=caps
        or [mount_cap(Mode.SINGLE_NODE_WRITER), mount_cap(Mode.MULTI_NODE_READER_ONLY)],
        parameters={"pool": POOL, "stripeWidth": str(stripes)},
    )
    volume: csi_pb2.Volume = driver.controller.CreateVolume(request, timeout=600).volume
    return volume


class Attached:
    """One volume published to, staged and published on one GPU VM."""

    def __init__(
        self,
        driver: Driver,
        volume: csi_pb2.Volume,
        vm: str,
        mode: int,
        secrets: dict[str, str] | None = None,
        block: bool = False,
        readonly: bool = False,
    ) -> None:
        self.driver, self.volume, self.vm = driver, volume, vm
        self.cap = block_cap(mode) if block else mount_cap(mode)
        self.readonly = readonly or mode == Mode.MULTI_NODE_READER_ONLY
        self.staging = f"/run/csi-test/{volume.volume_id}/staging"
        self.target = f"/run/csi-test/{volume.volume_id}/target"
        published = driver.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume.volume_id,
                node_id=host_nqn(vm),
                volume_capability=self.cap,
                readonly=self.readonly,
                volume_context=volume.volume_context,
            ),
            timeout=600,
        )
        node = driver.nodes[vm]
        node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id,
                publish_context=published.publish_context,
                staging_target_path=self.staging,
                volume_capability=self.cap,
                volume_context=volume.volume_context,
                secrets=secrets or {},
            ),
            timeout=600,
        )
        node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id,
                staging_target_path=self.staging,
                target_path=self.target,
                volume_capability=self.cap,
                readonly=self.readonly,
                volume_context=volume.volume_context,
            ),
            timeout=120,
        )

    def detach(self) -> None:
        vid, node = self.volume.volume_id, self.driver.nodes[self.vm]
        node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=self.target), timeout=120
        )
        node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=self.staging),
            timeout=300,
        )
        self.driver.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=host_nqn(self.vm)),
            timeout=600,
        )


@contextmanager
def cleaned_up(lab: Lab, driver: Driver, vid: str, vm: str) -> Iterator[None]:
    """A scenario's volume unpublished and deleted whatever the scenario did (both calls
    are idempotent); a CSI call refused is a failure with the driver's logs."""
    try:
        yield
    except grpc.RpcError as err:
        raise AssertionError(f"{err.code()}: {err.details()}\n{logs(lab)}") from None
    finally:
        driver.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=host_nqn(vm)),
            timeout=600,
        )
        driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=600)


def logs(lab: Lab) -> str:
    return (
        f"--- controller ---\n{controller_log(lab)}\n--- gpu-0 ---\n{node_log(lab, 'gpu-0')}"
        f"\n--- gpu-1 ---\n{node_log(lab, 'gpu-1')}\n--- agent ---\n"
        f"{agent_log(lab, 'storage-0')}"
    )


def test_written_once_then_read_only_on_two_gpus_at_once(
    lab: Lab, driver: Driver, scenario: Scenario
) -> None:
    volume = create(driver, "pvc-csi-dataset")
    try:
        writer = Attached(driver, volume, GPU0.name, Mode.SINGLE_NODE_WRITER)
        written = sh(
            lab,
            GPU0.name,
            f"head -c 8M /dev/urandom > {writer.target}/dataset && "
            f"sync && sha256sum < {writer.target}/dataset | cut -d' ' -f1",
        ).strip()
        writer.detach()
        readers = [Attached(driver, volume, g.name, Mode.MULTI_NODE_READER_ONLY) for g in GPUS]
        for reader in readers:
            read = sh(lab, reader.vm, f"sha256sum < {reader.target}/dataset | cut -d' ' -f1")
            assert read.strip() == written, reader.vm
            options = sh(lab, reader.vm, f"findmnt -no OPTIONS {reader.target}").strip()
            assert options.split(",")[0] == "ro", options
            refused = lab.exec(reader.vm, f"touch {reader.target}/x", check=False)
            assert refused.rc != 0 and "Read-only file system" in refused.output
        # A path down turns the volume's condition abnormal; back up, normal again.
        node, vid = driver.nodes[GPU1.name], volume.volume_id

        def abnormal() -> bool:
            stats = node.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=readers[1].target),
                timeout=60,
            )
            return bool(stats.volume_condition.abnormal)

        lab.cut_link(STORAGE1.name)
        try:
            assert processes.wait_until(abnormal, 90, interval=1.0), "condition stayed normal"
        finally:
            lab.restore_link(STORAGE1.name)
        assert processes.wait_until(lambda: not abnormal(), 120, interval=1.0)
        for reader in readers:
            reader.detach()
    except grpc.RpcError as err:
        raise AssertionError(f"{err.code()}: {err.details()}\n{logs(lab)}") from None
    finally:
        driver.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=600
        )
    scenario.done(
        "striped volume written on gpu-0, then read-only on gpu-0 and gpu-1 at once: "
        "same sha256 on both, writes refused; a cut link turned its condition abnormal, "
        "normal again once restored"
    )


def test_with_authentication_the_nodes_key_attaches_and_a_wrong_key_is_refused(
    lab: Lab, driver: Driver, agents: LocalCluster, scenario: Scenario
) -> None:
    kube = agents.kube
    gpu = host_nqn(GPU0.name)
    key, wrong = (sh(lab, GPU0.name, f"nvme gen-dhchap-key -n {gpu}").strip() for _ in range(2))
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": "dhchap-csi-gpu-0",
                "namespace": NAMESPACE,
                "labels": {KEY_LABEL: "true"},
                "annotations": {HOST_NQN_ANNOTATION: gpu},
            },
            "data": {"key": base64.b64encode(key.encode()).decode()},
        }
    )
    # The node's own key lives on the node, where libnvme looks for it; the node plugin may
    # read no Secret. The agents get the same key from the Secret above.
    sh(lab, GPU0.name, f"(umask 077; echo '{key}' > /etc/nvme/hostkey)")
    kube.patch(API, "StoragePool", POOL, {"spec": {"security": {"dhchap": True}}})
    volume = create(driver, "pvc-csi-auth", stripes=1)
    try:
        assert volume.volume_context["dhchap"] == "true"
        # A node-stage secret with the wrong key: the target kernel refuses the connection.
        with pytest.raises(grpc.RpcError) as refused:
            Attached(driver, volume, GPU0.name, Mode.SINGLE_NODE_WRITER, {"dhchapKey": wrong})
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert any(m in refused.value.details() for m in WRONG_KEY_REFUSALS), logs(lab)
        assert wrong not in refused.value.details() and wrong not in node_log(lab, GPU0.name)
        # The node's own key, from /etc/nvme/hostkey: attached, and the volume takes writes.
        attached = Attached(driver, volume, GPU0.name, Mode.SINGLE_NODE_WRITER)
        sh(lab, GPU0.name, f"echo keyed > {attached.target}/proof && sync")
        assert key not in node_log(lab, GPU0.name)
        attached.detach()
    except grpc.RpcError as err:
        raise AssertionError(f"{err.code()}: {err.details()}\n{logs(lab)}") from None
    finally:
        driver.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id=gpu),
            timeout=600,
        )
        driver.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=600
        )
        kube.patch(API, "StoragePool", POOL, {"spec": {"security": {"dhchap": False}}})
        kube.delete("v1", "Secret", "dhchap-csi-gpu-0", NAMESPACE)
        sh(lab, GPU0.name, "rm -f /etc/nvme/hostkey")
    scenario.done(
        "DH-HMAC-CHAP through CSI: a wrong node-stage key refused by the target, "
        "the node's key from its /etc/nvme/hostkey attached and wrote"
    )


def test_a_raw_block_volume_staged_as_a_filesystem_is_refused_and_kept(
    lab: Lab, driver: Driver, scenario: Scenario
) -> None:
    """A raw block volume its user wrote (a VM image, a database's device), staged later
    as a filesystem (a static PV over the same handle, a mode-changing restore). mkfs.ext4
    without a terminal formats whatever it is given without asking: a partition table
    (blkid finds no filesystem under TYPE) or data blkid does not recognise at all. Both
    must be refused, the bytes intact; and a read-only publish must not take writes."""
    gpu, writer = GPU0.name, Mode.SINGLE_NODE_WRITER
    volume = create(driver, "pvc-csi-raw", stripes=1, caps=[block_cap(writer)])
    vid = volume.volume_id
    node = driver.nodes[gpu]
    checksum = "head -c 16M {target} | sha256sum | cut -d' ' -f1"

    def refused_as_ext4() -> str:
        """Stages it as ext4, expecting a refusal; leaves it unstaged and unpublished."""
        with pytest.raises(grpc.RpcError) as refused:
            Attached(driver, volume, gpu, writer)
        node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(
                volume_id=vid, staging_target_path=f"/run/csi-test/{vid}/staging"
            ),
            timeout=300,
        )
        driver.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=host_nqn(gpu)),
            timeout=600,
        )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, logs(lab)
        return str(refused.value.details())

    with cleaned_up(lab, driver, vid, gpu):
        raw = Attached(driver, volume, gpu, writer, block=True)
        sh(
            lab,
            gpu,
            f"printf 'label: gpt\\n,\\n' | sfdisk -q {raw.target} >/dev/null && "
            f"dd if=/dev/urandom of={raw.target} bs=1M seek=1 count=8 oflag=direct status=none",
        )
        partitioned = sh(lab, gpu, checksum.format(target=raw.target)).strip()
        raw.detach()
        assert "holds a gpt partition table" in refused_as_ext4()
        again = Attached(driver, volume, gpu, writer, block=True)
        assert sh(lab, gpu, checksum.format(target=again.target)).strip() == partitioned
        # Without its table, nothing on it is anything blkid knows.
        sh(lab, gpu, f"wipefs -a -q {again.target} && sync")
        assert lab.exec(gpu, f"blkid -p {again.target}", check=False).rc == 2
        unknown = sh(lab, gpu, checksum.format(target=again.target)).strip()
        again.detach()
        assert "was published as a raw block device before" in refused_as_ext4()
        # Published read-only (a PV or pod volume with readOnly): its bytes read back, and
        # a write to the device fails, where a read-only bind mount of a device node
        # alone let it through.
        ro = Attached(driver, volume, gpu, writer, block=True, readonly=True)
        assert sh(lab, gpu, checksum.format(target=ro.target)).strip() == unknown
        write = lab.exec(
            gpu, f"dd if=/dev/zero of={ro.target} bs=4k count=1 oflag=direct", check=False
        )
        refusals = ("Operation not permitted", "Permission denied", "Read-only file system")
        assert write.rc != 0 and any(r in write.output for r in refusals), write.output
        ro.detach()
    scenario.done(
        "a block volume partitioned (gpt) and written, staged as ext4: refused (the table "
        "named); its table wiped, leaving data blkid knows nothing of, staged as ext4: "
        "refused (written as a raw device); sha256 of its first 16 MiB intact each time; "
        "published read-only, a write to the device failed"
    )


def test_the_node_connects_with_the_identity_the_hosts_other_connections_use(
    lab: Lab, driver: Driver, agents: LocalCluster, scenario: Scenario
) -> None:
    """GPU-1's /etc/nvme holds the NQN `nvme gen-hostnqn` derives and a random host ID, as
    Debian's nvme-cli package writes them, and another tool keeps a connection made with
    that pair. The kernel refuses that NQN with any other host ID (EINVAL): the node
    plugin must stage with the host's own pair, not one it derives itself."""
    gpu = GPU1.name
    other_id = "8590f8cf-31c1-4bee-9572-8d457b808130"
    # Written while the node plugin runs: it reads the pair again at every connect.
    sh(lab, gpu, f"cp /etc/nvme/hostid /run/hostid.lab && echo {other_id} > /etc/nvme/hostid")
    other = create(driver, "pvc-csi-other-tool", stripes=1)
    mine = create(driver, "pvc-csi-own-identity", stripes=1)
    writer = Mode.SINGLE_NODE_WRITER
    nqn = ""
    try:
        # The other tool: nvme-cli with the host's defaults, on a volume of its own.
        driver.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=other.volume_id, node_id=host_nqn(gpu),
                volume_capability=block_cap(writer), volume_context=other.volume_context,
            ),
            timeout=600,
        )  # fmt: skip
        found = agents.kube.get(API, "Volume", other.volume_id)
        assert found is not None
        (segment,) = found["status"]["segments"]
        nqn, address = segment["subsystemNQN"], segment["endpoints"][0]["address"]
        sh(
            lab,
            gpu,
            f"modprobe nvme-tcp\nnvme connect -t tcp -a {address} -s 4420 -n {nqn} >/dev/null",
        )
        ids = sh(
            lab,
            gpu,
            "for c in /sys/class/nvme/nvme*; do "
            f'[ "$(cat $c/subsysnqn)" = {nqn} ] && cat $c/hostid; done; true',
        )
        assert ids.split() == [other_id], ids
        attached = Attached(driver, mine, gpu, writer)
        sh(lab, gpu, f"echo written > {attached.target}/file && sync")
        attached.detach()
    except grpc.RpcError as err:
        raise AssertionError(f"{err.code()}: {err.details()}\n{logs(lab)}") from None
    finally:
        if nqn:
            lab.exec(gpu, f"nvme disconnect -n {nqn} >/dev/null", check=False)
        sh(lab, gpu, "cp /run/hostid.lab /etc/nvme/hostid")
        for volume in (other, mine):
            driver.controller.ControllerUnpublishVolume(
                csi_pb2.ControllerUnpublishVolumeRequest(
                    volume_id=volume.volume_id, node_id=host_nqn(gpu)
                ),
                timeout=600,
            )
            driver.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id), timeout=600
            )
    scenario.done(
        f"{gpu}'s /etc/nvme pairs its NQN with a random host ID and another connection uses "
        "that pair: the node plugin staged, wrote and unstaged a volume beside it"
    )


def test_a_striped_block_volume_grows_online_in_the_pods_device(
    lab: Lab, driver: Driver, scenario: Scenario
) -> None:
    """A striped raw block volume in use grows: the controller grows its segments and asks
    for node expansion (there is a dm stripe to reload), the node reloads the table over
    the grown segments, and the device the pod holds shows the new size with its bytes
    where they were and room written past the old end."""
    gpu, writer = GPU0.name, Mode.SINGLE_NODE_WRITER
    volume = create(driver, "pvc-csi-grow-block", stripes=2, caps=[block_cap(writer)])
    vid, size = volume.volume_id, 64 << 20
    checksum = "head -c 16M {target} | sha256sum | cut -d' ' -f1"
    with cleaned_up(lab, driver, vid, gpu):
        attached = Attached(driver, volume, gpu, writer, block=True)
        target = attached.target
        sh(lab, gpu, f"dd if=/dev/urandom of={target} bs=1M count=16 oflag=direct status=none")
        before = sh(lab, gpu, checksum.format(target=target)).strip()
        grown = driver.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=vid,
                capacity_range=csi_pb2.CapacityRange(required_bytes=2 * size),
                volume_capability=attached.cap,
            ),
            timeout=600,
        )
        assert grown.capacity_bytes == 2 * size and grown.node_expansion_required
        answer = driver.nodes[gpu].NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(
                volume_id=vid,
                volume_path=target,
                staging_target_path=attached.staging,
                capacity_range=csi_pb2.CapacityRange(required_bytes=2 * size),
                volume_capability=attached.cap,
            ),
            timeout=300,
        )
        seen = int(sh(lab, gpu, f"blockdev --getsize64 {target}").strip())
        assert answer.capacity_bytes == seen == 2 * size, (answer.capacity_bytes, seen)
        assert sh(lab, gpu, checksum.format(target=target)).strip() == before
        sh(lab, gpu, f"dd if=/dev/urandom of={target} bs=1M seek=100 count=8 oflag=direct "
                     "status=none")  # fmt: skip
        attached.detach()
    scenario.done(
        f"a 2-way striped block volume published on {gpu} grew online from 64 to 128 MiB: "
        "the pod's device shows 128 MiB, its first 16 MiB unchanged, 8 MiB written past "
        "the old end"
    )


# GPU-0's soft-RoCE in the transport scenario: a port on a dummy interface with an address
# of its own (a fabric that leads elsewhere, as NCCL's may), then one on eth0, the route to
# storage-0. Policy rules then leave storage-0's address reachable by TCP only: the node
# reads the main routing table alone, so it still tries RDMA first, and the kernel's rdma
# connect fails at its first step (rdma_resolve_addr: ENETUNREACH), at once. Dropping
# RoCE's UDP port instead (the guest has tc, no nft or iptables) would fail it only after
# the RDMA CM's connect retries, about 100 s under emulation.
RXE_ASIDE, RXE_ROUTED, ASIDE = "rxe_aside", "rxe_eth0", "fmaside0"
STORAGE0_ADDRESS = STORAGE0.address(0)
TCP_ONLY_RULES = (1000, 1001)
ASIDE_UP = f"""
modprobe dummy numdummies=0
ip link add {ASIDE} type dummy
ip addr add 192.0.2.3/24 dev {ASIDE}
ip link set {ASIDE} up
modprobe rdma_rxe; modprobe ib_uverbs
rdma link add {RXE_ASIDE} type rxe netdev {ASIDE}
"""
ROUTED_UP = f"""
rdma link add {RXE_ROUTED} type rxe netdev eth0
ip rule add prio {TCP_ONLY_RULES[0]} to {STORAGE0_ADDRESS} ipproto tcp lookup main
ip rule add prio {TCP_ONLY_RULES[1]} to {STORAGE0_ADDRESS} unreachable
ip route get {STORAGE0_ADDRESS} ipproto tcp | grep -q ' dev eth0 '
if ip route get {STORAGE0_ADDRESS} >/dev/null 2>&1; then echo "not only TCP"; exit 1; fi
"""
FABRIC_CLEAN = f"""
for prio in {TCP_ONLY_RULES[0]} {TCP_ONLY_RULES[1]}; do
  ip rule del prio $prio 2>/dev/null || true
done
for d in {RXE_ROUTED} {RXE_ASIDE}; do
  [ ! -e /sys/class/infiniband/$d ] || rdma link delete $d
done
ip link del {ASIDE} 2>/dev/null || true
"""
NODE_VIEW = (
    f"{sys.executable} -c 'from flashmesh.csi_driver import fabric_paths as f; "
    "from flashmesh.dataplane import rdma; print(*sorted(f.rdma_interfaces(rdma.discover())))'"
)
SHA = "sha256sum < {path} | cut -d' ' -f1"


def test_rdma_only_over_the_route_to_the_storage_and_tcp_when_its_connect_fails(
    lab: Lab, driver: Driver, agents: LocalCluster, scenario: Scenario
) -> None:
    """A 2-way striped volume, one segment on storage-0 (advertised over rdma and tcp), on
    GPU-0 with soft-RoCE. First its only RDMA port is ACTIVE on a dummy interface, not the
    one storage-0's address is routed through: the segment is staged over TCP and RDMA is
    never tried (no fallback Event). Then a second port on eth0, the route to storage-0,
    with rules that leave that address reachable by TCP alone: the node tries RDMA, the
    kernel refuses it, the segment is staged over TCP, the volume reads what part one
    wrote and takes more, and the Volume has a TransportFallback Event."""
    gpu, writer, storage = GPU0.name, Mode.SINGLE_NODE_WRITER, STORAGE0_ADDRESS
    kube = agents.kube
    attempts: list[str] = []

    def port_active(device: str) -> bool:
        return " state ACTIVE " in sh(lab, gpu, f"rdma link show {device}/1")

    def node_view() -> list[str]:
        """The interfaces the node plugin takes RDMA over, by its own code in the VM."""
        return sh(lab, gpu, NODE_VIEW).split()

    def transports(nqn: str) -> list[str]:
        return sh(lab, gpu, "for c in /sys/class/nvme/nvme*; do "
                            f'[ "$(cat $c/subsysnqn)" = {nqn} ] && cat $c/transport; done; true'
                  ).split()  # fmt: skip

    def fallbacks(uid: str) -> list[dict[str, Any]]:
        return [
            e for e in kube.list("v1", "Event", namespace="default")
            if e.get("reason") == "TransportFallback" and e["involvedObject"].get("uid") == uid
        ]  # fmt: skip

    def undo(vid: str) -> None:
        """Whatever an attempt left on GPU-0, even a failed one: the volume staged and
        published, the RDMA ports, the dummy interface, the rules."""
        if not lab.vms().get(gpu):
            return  # it died, and boots again with none of them
        node, base = driver.nodes[gpu], f"/run/csi-test/{vid}"
        with contextlib.suppress(grpc.RpcError):
            node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=f"{base}/target"),
                timeout=120,
            )
        with contextlib.suppress(grpc.RpcError):
            node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=vid, staging_target_path=f"{base}/staging"
                ),
                timeout=300,
            )
        with contextlib.suppress(VmDied):
            lab.exec(gpu, FABRIC_CLEAN, check=False)

    def both_parts(volume: csi_pb2.Volume) -> str:
        vid = volume.volume_id
        # 1. An ACTIVE RDMA port, on an interface that does not lead to storage-0.
        sh(lab, gpu, ASIDE_UP)
        assert processes.wait_until(lambda: port_active(RXE_ASIDE), 60), sh(lab, gpu, "rdma link")
        assert node_view() == [ASIDE]
        table = sh(lab, gpu, "cat /proc/net/route")
        assert fabric_paths.route_interface(storage, table) == "eth0", table
        attached = Attached(driver, volume, gpu, writer)
        found = kube.get(API, "Volume", vid) or {}
        uid = found["metadata"]["uid"]
        (segment,) = [
            s for s in found["status"]["segments"] if s["node"] == node_name(STORAGE0.name)
        ]
        assert sorted(e["transport"] for e in segment["endpoints"]) == ["rdma", "tcp"], segment
        nqn = segment["subsystemNQN"]
        assert transports(nqn) == ["tcp"]
        assert fallbacks(uid) == []
        first = f"{attached.target}/first"
        sh(lab, gpu, f"head -c 4M /dev/urandom > {first} && sync")
        written = sh(lab, gpu, SHA.format(path=first)).strip()
        attached.detach()
        # 2. RDMA over the route to storage-0, which the kernel refuses: TCP instead.
        sh(lab, gpu, ROUTED_UP)
        assert processes.wait_until(lambda: port_active(RXE_ROUTED), 60), sh(lab, gpu, "rdma link")
        assert node_view() == sorted(["eth0", ASIDE])
        again = Attached(driver, volume, gpu, writer)
        assert transports(nqn) == ["tcp"]
        assert processes.wait_until(lambda: bool(fallbacks(uid)), 30), node_log(lab, gpu)
        (event,) = fallbacks(uid)
        message = event["message"]
        assert event["type"] == "Warning" and nqn in message, event
        assert "the connect over rdma failed" in message and "over tcp instead" in message
        first, second = f"{again.target}/first", f"{again.target}/second"
        assert sh(lab, gpu, SHA.format(path=first)).strip() == written
        sh(lab, gpu, f"head -c 4M /dev/urandom > {second} && sync")
        more = sh(lab, gpu, SHA.format(path=second)).strip()
        sh(lab, gpu, "echo 3 > /proc/sys/vm/drop_caches")  # read back from the volume
        assert sh(lab, gpu, SHA.format(path=second)).strip() == more
        again.detach()
        why = re.search(r"failed: ([^;()]+)", message)
        return why.group(1).strip() if why else message

    def attempt() -> str:
        if attempts:  # GPU-0's kernel panicked: booted again, it needs its node plugin
            start_node_plugin(lab, agents, gpu)
            driver.nodes[gpu] = node_stub(GPU0.address(0))
        attempts.append(gpu)
        volume = create(driver, "pvc-csi-transport", stripes=2)
        with cleaned_up(lab, driver, volume.volume_id, gpu):
            try:
                return both_parts(volume)
            finally:
                undo(volume.volume_id)

    why, note = retry_after_guest_panic(lab, attempt, "rdma_rxe")
    left = sh(lab, gpu, f"rdma link show; ip rule | grep -F 'to {storage}' || true; "
                        f"ip link show {ASIDE} 2>/dev/null || true")  # fmt: skip
    assert not left.strip(), left
    scenario.done(
        f"{gpu} with soft-RoCE ACTIVE only on {ASIDE}, storage-0 routed over eth0: the "
        "segment storage-0 serves over rdma and tcp staged over tcp, rdma not tried; with a "
        "second port on eth0 and storage-0 reachable by TCP alone: rdma tried first and "
        f"refused by the kernel ({why}), staged over tcp, a TransportFallback Event, 4 MiB "
        f"read back and 4 MiB more written and read back{note}"
    )
