"""One fault, one object: a storage agent whose lvextend fails keeps exporting that volume at
the size it has, and a malformed DH-HMAC-CHAP key Secret refuses that host alone; the other
host keeps connecting and verifying I/O on the same node."""

from __future__ import annotations

import pytest
from agents import (
    API,
    NAMESPACE,
    POOL,
    agent_command,
    agent_log,
    create_volume,
    segments,
    start_agent,
    stop_agent,
)
from helpers import GPU0, GPU1, MIB, STORAGE0, Scenario, assert_verified, fio_result, sh

from flashmesh.core import naming
from flashmesh.dataplane.agent import HOST_NQN_ANNOTATION, KEY_LABEL
from flashmesh.dataplane.faults import FAIL_ENV
from flashmesh.lab import processes
from flashmesh.lab.cluster import LocalCluster
from flashmesh.lab.vm import Lab, host_nqn

pytestmark = pytest.mark.kernel

GPU, VM = GPU0.name, STORAGE0.name
# A key typed by hand, not in the DHHC-1 form: nvmet refuses to take it.
MALFORMED = "s3cr3t-typed-by-hand"


def key_secret(name: str, host: str, key: str) -> dict[str, object]:
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {KEY_LABEL: "true"},
                     "annotations": {HOST_NQN_ANNOTATION: host}},
        "stringData": {"key": key},
    }  # fmt: skip


def test_a_failed_grow_and_a_malformed_key_never_take_an_export_away(
    lab: Lab, agents: LocalCluster, scenario: Scenario
) -> None:
    kube = agents.kube
    gpu, other = host_nqn(GPU), host_nqn(GPU1.name)
    key = sh(lab, GPU, f"nvme gen-dhchap-key -n {gpu}").strip()
    kube.create(key_secret("dhchap-faults-gpu-0", gpu, key))
    kube.create(key_secret("dhchap-faults-gpu-1", other, MALFORMED))
    kube.patch(API, "StoragePool", POOL, {"spec": {"security": {"dhchap": True}}})
    stop_agent(lab, STORAGE0)
    lab.spawn(VM, f"{FAIL_ENV}=lvextend exec {agent_command(STORAGE0)}")
    faulty = True
    vid = create_volume(kube, "pvc-agent-faults", [VM], "32Mi", [gpu, other])
    nqn = naming.subsystem_nqn(vid, 0, 0)

    def segment() -> dict[str, object]:
        found = segments(kube, vid)
        return found[0] if found else {}

    try:
        # The malformed key refuses its host only: the other is allowed, and told why.
        assert processes.wait_until(
            lambda: segment().get("ready") is True and segment().get("hosts") == [gpu], 300
        ), f"{segment()}\n{agent_log(lab, VM)}"
        message = str(segment().get("message") or "")
        assert f"the DH-HMAC-CHAP key Secret of {other} is malformed" in message, message
        assert MALFORMED not in message and MALFORMED not in agent_log(lab, VM)
        connect = (
            f"modprobe nvme-tcp\nnvme connect -t tcp -a {STORAGE0.address(0)} -s 4420 "
            f"-n {nqn} --dhchap-secret='{key}'\nnvme_device {nqn}"
        )
        device = sh(lab, GPU, connect).strip()
        assert_verified(fio_result(sh(lab, GPU, f"fio_verify {device} 16M")), 16 * MIB)

        # A grow whose lvextend fails: still exported at 32 MiB, the status says why.
        data = kube.get(API, "Volume", vid)
        assert data is not None
        data["spec"]["size"] = data["spec"]["segments"][0]["size"] = "64Mi"
        kube.replace(data)
        held = "growing to 64Mi failed, still serving 32Mi"
        assert processes.wait_until(lambda: held in str(segment().get("message") or ""), 300), (
            f"{segment()}\n{agent_log(lab, VM)}"
        )
        assert segment()["ready"] is True and segment()["size"] == "32Mi"
        exports = f"ls /sys/kernel/config/nvmet/ports/*/subsystems/{nqn}"
        assert lab.exec(VM, exports, check=False).rc == 0
        verified = fio_result(sh(lab, GPU, f"fio_verify {device} 16M --verify_only"))
        assert verified["error"] == 0 and verified["read"]["io_bytes"] == 16 * MIB
        assert_verified(fio_result(sh(lab, GPU, f"fio_verify {device} 16M")), 16 * MIB)

        # The fault gone, the next pass grows it.
        stop_agent(lab, STORAGE0)
        start_agent(lab, STORAGE0)
        faulty = False
        assert processes.wait_until(lambda: segment().get("size") == "64Mi", 300), segment()
    finally:
        sh(lab, GPU, f"nvme disconnect -n {nqn} || true")
        if faulty:  # later scenarios get an agent without the injected failure
            stop_agent(lab, STORAGE0)
            start_agent(lab, STORAGE0)
        kube.delete(API, "Volume", vid)
        kube.patch(API, "StoragePool", POOL, {"spec": {"security": {"dhchap": False}}})
        for name in ("dhchap-faults-gpu-0", "dhchap-faults-gpu-1"):
            kube.delete("v1", "Secret", name, NAMESPACE)
    assert processes.wait_until(lambda: kube.get(API, "Volume", vid) is None, 300)
    scenario.done(
        f"{FAIL_ENV}=lvextend: the grow failed, the volume stayed exported at 32 MiB and "
        "gpu-0 verified its data and new writes; a malformed key Secret refused gpu-1 alone "
        "(said in the status, never quoted); the fault gone, the volume grew"
    )
