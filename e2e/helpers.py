"""Shared pieces of the kernel lab scenarios: the VMs, shell in a VM, fio's verdicts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flashmesh.lab.kernel import GUEST
from flashmesh.lab.vm import Drive, Lab, VmDied, VmSpec

LIB = GUEST / "lab-lib.sh"
MIB = 1 << 20
T = TypeVar("T")

# The storage agent's pool takes the only 1 GiB drive of each storage VM (by minimum size).
AGENT_DRIVE = Drive(1024)
# storage-0: drive 0 for the TCP scenario, drive 1 for RDMA, drive 2 for hand-made LVM
# volumes, drive 3 for FlashMesh's own LVM layer, drive 4 for the agent.
STORAGE0 = VmSpec(
    "storage-0",
    1,
    drives=(Drive(256), Drive(256), Drive(768), Drive(256), AGENT_DRIVE),
    links=2,
    memory_mib=384,
)
# storage-1: drive 0 for hand-made LVM volumes (the second half of a stripe, the restart
# scenario), throttled (at 200 MB/s, above what emulation reaches) so the option is
# exercised; drive 1 for the agent; drives 2 and 3 match the agent's pool too, but 2 holds
# a filesystem and 3 conflicting leftover signatures, which the agent must refuse and leave
# alone.
STORAGE1 = VmSpec(
    "storage-1",
    2,
    drives=(Drive(512, bps=200 << 20), AGENT_DRIVE, AGENT_DRIVE, AGENT_DRIVE),
    links=1,
    memory_mib=384,
)
GPU0 = VmSpec("gpu-0", 3, links=2)
# A second host, for what one host does while another is cut off or refused.
GPU1 = VmSpec("gpu-1", 4)


@dataclass
class Scenario:
    """Times one scenario and adds its summary line to the run's report."""

    name: str
    lines: list[str]
    begin: float = 0.0

    def done(self, result: str) -> None:
        self.lines.append(f"{self.name}: {result} ({time.monotonic() - self.begin:.1f} s wall)")


def sh(lab: Lab, vm: str, script: str, timeout: float = 300, check: bool = True) -> str:
    """Runs a script in a VM with the lab's shell helpers loaded; its output."""
    return lab.exec(vm, f"set -e\nsource {LIB}\n{script}", timeout=timeout, check=check).output


def retry_after_guest_panic(
    lab: Lab, attempt: Callable[[], T], culprit: str, retries: int = 2
) -> tuple[T, str]:
    """Runs attempt; if a VM's emulated kernel panics in `culprit` (seen in about 2 of 12
    runs with rdma_rxe under TCG: a NULL dereference in net_rx_action, a bug of the guest
    kernel, not of FlashMesh), boots that VM again and runs attempt again, at most
    `retries` times. Returns its result and a note for the summary line, so a retry is
    never silent."""
    note = ""
    for tries in range(retries + 1):
        try:
            return attempt(), note
        except VmDied as died:
            panicked = "Kernel panic" in str(died) and culprit in str(died)
            if tries == retries or not panicked:
                raise
            lab.revive()
            note = f"; {died.vm}'s kernel panicked in {culprit}, retries: {tries + 1}"
    raise AssertionError("unreachable")


# How the kernel refuses a wrong DH-HMAC-CHAP key: mostly with the rejection itself; under
# emulation sometimes only as an I/O error after its 60 s connect timeout.
WRONG_KEY_REFUSALS = ("Key was rejected by service", "Input/output error")


def fio_result(output: str) -> dict[str, Any]:
    """fio's JSON (the output may start with other lines)."""
    job: dict[str, Any] = json.loads(output[output.index("{") :])["jobs"][0]
    return job


def assert_verified(job: dict[str, Any], size: int) -> None:
    """Every byte written was read back and matched its checksum."""
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] == size, job["write"]
    assert job["read"]["io_bytes"] == size, job["read"]  # the verify pass


# One 4 KiB direct write to {dev}; prints dd's exit code (124: still blocked after 60 s), or
# "gone" when the device node is gone. dd never creates the file (conv=nocreat): a node
# removed between the test and the open (a controller given up just then) would otherwise
# become a plain file in /dev that takes the write, answers 0, and stands in the way of the
# next device of that name. The script runs under `set -e`: a failing dd must not end it
# before the code is printed.
DIRECT_WRITE = (
    "if [ -b {dev} ]; then rc=0; timeout 60 dd if=/dev/urandom of={dev} bs=4k count=1 "
    "oflag=direct conv=nocreat 2>/dev/null || rc=$?; echo $rc; else echo gone; fi"
)
