"""From the tree nvmet has (observed) to the one FlashMesh wants (desired): a pure plan of
configfs operations in an order the kernel accepts.

The kernel's rules, and where the plan keeps them:
- A namespace's attributes change only while it is disabled: disable, write, enable.
- attr_allow_any_host=1 is refused while allowed_hosts holds links, and links are refused
  while it is 1: unlink stale hosts, then write the flag, then link new hosts.
- A subsystem linked from a port cannot be removed: unlink it from every port first.
- A subsystem with namespaces cannot be removed: disable and remove them first.
- A port's address is fixed while subsystems are linked to it: unlink, write, link again.
- A host entry linked from a subsystem cannot be removed: unlink it everywhere first.
- A port with ANA groups of its own (beyond group 1) cannot be removed: remove them first.
- A host's DH-HMAC-CHAP key cannot be cleared (an empty write is refused): a host entry
  holding a key no longer wanted is unlinked, removed and made again. Its live
  connections stay; they were authenticated when they connected.
The kernel checks allowed hosts only when a host connects, so removing a host from a
subsystem also ends the host's live controllers: `fence` records the cut-off before the
unlink, `disconnect` ends the controllers and clears the record. A host observed as still
being cut off (recorded, or listed by nvmet's debugfs) is disconnected on every plan until
it is not: an agent stopped between two steps finishes the cut-off on its next pass. A kept
host (refused new connections only) is recorded and unlinked but keeps its live
controllers, until it is kept no longer: then it is allowed again, or cut off.

Only FlashMesh's own subsystems (by NQN prefix) and ports (by id range) are changed;
anything else found in the tree is left as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from flashmesh.core.naming import is_flashmesh_nqn
from flashmesh.dataplane.target.model import PORT_ID_BASE, Host, Port, Subsystem, Target

Op = Literal["mkdir", "rmdir", "write", "link", "unlink", "fence", "disconnect"]


@dataclass(frozen=True)
class Action:
    """One configfs operation; paths are relative to the nvmet root. For `link` the value
    is the target's path; for `fence` and `disconnect` the path is the subsystem and the
    value the host."""

    op: Op
    path: str
    value: str = ""
    secret: bool = False

    def __str__(self) -> str:
        value = "<redacted>" if self.secret else self.value
        return f"{self.op} {self.path}" + (f" = {value}" if value else "")


def subsystem_path(nqn: str) -> str:
    return f"subsystems/{nqn}"


def namespace_path(nqn: str, nsid: int) -> str:
    return f"subsystems/{nqn}/namespaces/{nsid}"


def port_path(port_id: int) -> str:
    return f"ports/{port_id}"


def host_path(nqn: str) -> str:
    return f"hosts/{nqn}"


def plan(desired: Target, observed: Target) -> list[Action]:
    for port_id in desired.ports:
        if port_id < PORT_ID_BASE:
            raise ValueError(f"port {port_id}: FlashMesh's ports have ids from {PORT_ID_BASE}")
    for nqn in desired.subsystems:
        if not is_flashmesh_nqn(nqn):
            raise ValueError(f"subsystem {nqn}: FlashMesh manages only its own NQNs")
    actions: list[Action] = []
    actions += _unlink_ports(desired, observed)
    rekeyed, observed = _remake_unkeyed_hosts(desired, observed)
    actions += rekeyed
    actions += _remove_subsystems(desired, observed)
    actions += _write_hosts(desired, observed)
    for nqn in sorted(desired.subsystems):
        actions += _subsystem(desired.subsystems[nqn], observed.subsystems.get(nqn))
    actions += _ports(desired, observed)
    actions += _remove_hosts(desired, observed)
    return actions


def _address_changes(want: Port, have: Port) -> dict[str, str]:
    current = have.address()
    return {k: v for k, v in want.address().items() if current[k] != v}


def _unlink_ports(desired: Target, observed: Target) -> list[Action]:
    """Links that must go before anything else changes: FlashMesh subsystems no longer
    wanted on a port, and every link of a FlashMesh port whose address changes."""
    actions = []
    for port_id in sorted(observed.ports):
        have = observed.ports[port_id]
        want = desired.ports.get(port_id)
        ours = port_id >= PORT_ID_BASE
        readdress = want is not None and bool(_address_changes(want, have))
        for nqn in sorted(have.subsystems):
            wanted = want is not None and nqn in want.subsystems and nqn in desired.subsystems
            if (is_flashmesh_nqn(nqn) or ours) and (readdress or not wanted):
                actions.append(Action("unlink", f"{port_path(port_id)}/subsystems/{nqn}"))
    return actions


def _remove_subsystems(desired: Target, observed: Target) -> list[Action]:
    actions = []
    for nqn in sorted(observed.subsystems):
        if not is_flashmesh_nqn(nqn) or nqn in desired.subsystems:
            continue
        have = observed.subsystems[nqn]
        for host in sorted(have.allowed_hosts):
            actions.append(Action("unlink", f"{subsystem_path(nqn)}/allowed_hosts/{host}"))
        for nsid in sorted(have.namespaces):
            if have.namespaces[nsid].enable:
                actions.append(Action("write", f"{namespace_path(nqn, nsid)}/enable", "0"))
            actions.append(Action("rmdir", namespace_path(nqn, nsid)))
        actions.append(Action("rmdir", subsystem_path(nqn)))
    return actions


def _remake_unkeyed_hosts(desired: Target, observed: Target) -> tuple[list[Action], Target]:
    """Host entries whose key (or controller key) is no longer wanted, as when a pool turns
    DH-HMAC-CHAP off: unlinked from FlashMesh's subsystems and removed, so that the rest of
    the plan makes and links them again, keyless. Returns the actions and the tree as it
    will be after them. An entry another tool's subsystem links keeps its key."""
    foreign = {
        host
        for nqn, sub in observed.subsystems.items()
        if not is_flashmesh_nqn(nqn)
        for host in sub.allowed_hosts
    }
    stale = sorted(
        nqn
        for nqn, want in desired.hosts.items()
        if (have := observed.hosts.get(nqn)) is not None
        and nqn not in foreign
        and any(
            getattr(want, attr) is None and getattr(have, attr) is not None
            for attr in ("dhchap_key", "dhchap_ctrl_key")
        )
    )
    if not stale:
        return [], observed
    actions = []
    subsystems = dict(observed.subsystems)
    for nqn in sorted(subsystems):
        sub = subsystems[nqn]
        want = desired.subsystems.get(nqn)
        leaving = set()
        for host in sorted(sub.allowed_hosts.intersection(stale)):
            # A host leaving this subsystem in the same plan is recorded as being cut off
            # before this unlink, as _subsystem would: it then ends its controllers.
            if want is not None and not want.allow_any_host and host not in want.allowed_hosts:
                leaving.add(host)
                if host not in sub.cutting_off:
                    actions.append(Action("fence", subsystem_path(nqn), host))
            actions.append(Action("unlink", f"{subsystem_path(nqn)}/allowed_hosts/{host}"))
        subsystems[nqn] = dataclasses.replace(
            sub, allowed_hosts=sub.allowed_hosts - set(stale), cutting_off=sub.cutting_off | leaving
        )
    actions += [Action("rmdir", host_path(nqn)) for nqn in stale]
    hosts = {nqn: h for nqn, h in observed.hosts.items() if nqn not in stale}
    return actions, dataclasses.replace(observed, subsystems=subsystems, hosts=hosts)


def _write_hosts(desired: Target, observed: Target) -> list[Action]:
    actions = []
    for nqn in sorted(desired.hosts):
        want, have = desired.hosts[nqn], observed.hosts.get(nqn)
        if have is None:
            actions.append(Action("mkdir", host_path(nqn)))
            have = Host(nqn)
        for attr in ("dhchap_key", "dhchap_ctrl_key"):
            value = getattr(want, attr)
            if value is not None and value != getattr(have, attr):
                actions.append(Action("write", f"{host_path(nqn)}/{attr}", value, secret=True))
    return actions


def _subsystem(want: Subsystem, have: Subsystem | None) -> list[Action]:
    path = subsystem_path(want.nqn)
    actions = []
    if have is None:
        actions.append(Action("mkdir", path))
        have = Subsystem(want.nqn)  # the kernel's defaults
    if want.serial and want.serial != have.serial:
        actions.append(Action("write", f"{path}/attr_serial", want.serial))

    keep = frozenset() if want.allow_any_host else want.allowed_hosts
    for host in sorted((have.allowed_hosts | have.cutting_off) - keep):
        if host not in have.cutting_off:  # recorded first: it may still be connected
            actions.append(Action("fence", path, host))
        if host in have.allowed_hosts:
            actions.append(Action("unlink", f"{path}/allowed_hosts/{host}"))
        if host not in want.kept_hosts:
            actions.append(Action("disconnect", path, host))
    if want.allow_any_host != have.allow_any_host:
        actions.append(
            Action("write", f"{path}/attr_allow_any_host", str(int(want.allow_any_host)))
        )

    for nsid in sorted(have.namespaces.keys() - want.namespaces.keys()):
        if have.namespaces[nsid].enable:
            actions.append(Action("write", f"{namespace_path(want.nqn, nsid)}/enable", "0"))
        actions.append(Action("rmdir", namespace_path(want.nqn, nsid)))
    for nsid in sorted(want.namespaces):
        ns_path = namespace_path(want.nqn, nsid)
        ns, old = want.namespaces[nsid], have.namespaces.get(nsid)
        if old is None:
            actions.append(Action("mkdir", ns_path))
            changed = ns.attributes()
            enabled = False
        else:
            changed = {k: v for k, v in ns.attributes().items() if old.attributes()[k] != v}
            enabled = old.enable
        if changed and enabled:
            actions.append(Action("write", f"{ns_path}/enable", "0"))
            enabled = False
        actions += [Action("write", f"{ns_path}/{k}", v) for k, v in changed.items()]
        if ns.enable and not enabled:
            actions.append(Action("write", f"{ns_path}/enable", "1"))
        elif not ns.enable and enabled:
            actions.append(Action("write", f"{ns_path}/enable", "0"))

    for host in sorted(keep - have.allowed_hosts):
        actions.append(Action("link", f"{path}/allowed_hosts/{host}", host_path(host)))
    return actions


def _ports(desired: Target, observed: Target) -> list[Action]:
    actions = []
    for port_id in sorted(desired.ports):
        want, have = desired.ports[port_id], observed.ports.get(port_id)
        path = port_path(port_id)
        linked: frozenset[str] = frozenset()
        if have is None:
            actions.append(Action("mkdir", path))
            changes = want.address()
        else:
            changes = _address_changes(want, have)
            if not changes:  # its links stayed, but those unlinked above
                linked = frozenset(n for n in have.subsystems if n in want.subsystems)
        actions += [Action("write", f"{path}/{k}", v) for k, v in changes.items()]
        old_states = have.ana_states if have else {1: "optimized"}
        for grpid in sorted(old_states.keys() - want.ana_states.keys() - {1}):
            actions.append(Action("rmdir", f"{path}/ana_groups/{grpid}"))
        for grpid in sorted(want.ana_states):
            if grpid not in old_states:
                actions.append(Action("mkdir", f"{path}/ana_groups/{grpid}"))
            if old_states.get(grpid) != want.ana_states[grpid]:
                state = want.ana_states[grpid]
                actions.append(Action("write", f"{path}/ana_groups/{grpid}/ana_state", state))
        for nqn in sorted(want.subsystems - linked):
            if nqn in desired.subsystems:
                target = subsystem_path(nqn)
                actions.append(Action("link", f"{path}/subsystems/{nqn}", target))
    for port_id in sorted(observed.ports.keys() - desired.ports.keys()):
        if port_id >= PORT_ID_BASE:
            for grpid in sorted(observed.ports[port_id].ana_states.keys() - {1}):
                actions.append(Action("rmdir", f"{port_path(port_id)}/ana_groups/{grpid}"))
            actions.append(Action("rmdir", port_path(port_id)))
    return actions


def _remove_hosts(desired: Target, observed: Target) -> list[Action]:
    """Host entries FlashMesh linked and nobody will link any more: their keys go too.

    An entry no FlashMesh subsystem links is left alone, even when nothing links it: it may
    be another tool's, made a moment before that tool links it.
    """
    ours = {
        host
        for nqn, sub in observed.subsystems.items()
        if is_flashmesh_nqn(nqn)
        for host in sub.allowed_hosts
    }
    still_linked = {
        host
        for nqn, sub in observed.subsystems.items()
        if not is_flashmesh_nqn(nqn)
        for host in sub.allowed_hosts
    }
    for sub in desired.subsystems.values():
        still_linked |= sub.allowed_hosts
    return [
        Action("rmdir", host_path(nqn))
        for nqn in sorted((observed.hosts.keys() & ours) - desired.hosts.keys() - still_linked)
    ]
