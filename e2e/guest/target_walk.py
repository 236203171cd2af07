"""Runs inside a storage VM: walks nvmet's real configfs through a series of desired states
with FlashMesh's planner and writer, and prints, as JSON, for each state how many actions
it took and what a second plan would still do (nothing, when the kernel agrees).

    python target_walk.py HOST_A HOST_B DRIVE_A DRIVE_B ADDRESS_A ADDRESS_B
"""

from __future__ import annotations

import json
import sys

from flashmesh.core import naming
from flashmesh.dataplane.target.configfs import NVMET_ROOT, Fs, apply, observe
from flashmesh.dataplane.target.model import PORT_ID_BASE, Host, Namespace, Port, Subsystem, Target
from flashmesh.dataplane.target.planner import plan


def main(host_a: str, host_b: str, drive_a: str, drive_b: str, addr_a: str, addr_b: str) -> None:
    vid = naming.volume_id("walk")
    nqns = [naming.subsystem_nqn(vid, i, 0) for i in range(2)]

    def subsystem(nqn: str, drive: str, hosts: list[str], any_host: bool = False) -> Subsystem:
        ns = Namespace(1, drive, naming.namespace_uuid(nqn), naming.namespace_nguid(nqn))
        serial = naming.subsystem_serial(vid, nqns.index(nqn), 0)
        return Subsystem(nqn, serial, any_host, frozenset(hosts), {1: ns})

    def port(addr: str, linked: list[str], ana: dict[int, str] | None = None) -> Port:
        return Port(
            PORT_ID_BASE,
            "tcp",
            addr,
            "4420",
            subsystems=frozenset(linked),
            ana_states=ana or {1: "optimized"},
        )

    states = {
        "one subsystem, one host": Target(
            {nqns[0]: subsystem(nqns[0], drive_a, [host_a])},
            {PORT_ID_BASE: port(addr_a, nqns[:1])},
            {host_a: Host(host_a)},
        ),
        "two subsystems, two hosts": Target(
            {
                nqns[0]: subsystem(nqns[0], drive_a, [host_a, host_b]),
                nqns[1]: subsystem(nqns[1], drive_b, [host_b]),
            },
            {PORT_ID_BASE: port(addr_a, nqns)},
            {host_a: Host(host_a), host_b: Host(host_b)},
        ),
        "any host, drives swapped, port moved, ANA group": Target(
            {
                nqns[0]: subsystem(nqns[0], drive_b, [], any_host=True),
                nqns[1]: subsystem(nqns[1], drive_a, [host_a]),
            },
            {PORT_ID_BASE: port(addr_b, nqns, {1: "optimized", 2: "inaccessible"})},
            {host_a: Host(host_a)},
        ),
        "nothing": Target(),
    }
    fs = Fs(NVMET_ROOT)
    report = {}
    for name, desired in states.items():
        actions = plan(desired, observe(fs))
        apply(fs, actions)
        report[name] = {
            "actions": len(actions),
            "again": [str(a) for a in plan(desired, observe(fs))],
        }
    report["left"] = sorted(str(p.relative_to(NVMET_ROOT)) for p in NVMET_ROOT.glob("*/*"))
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main(*sys.argv[1:])
