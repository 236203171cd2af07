"""The nvmet planner: every ordering rule of the kernel, idempotency, convergence from a
tree left half-made, and the writer and reader against a temporary tree (FakeNvmet)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fake_nvmet import FakeNvmet
from flashmesh.core import naming
from flashmesh.dataplane.target.configfs import ConfigfsError, apply, apply_each, observe
from flashmesh.dataplane.target.fencing import Cutoffs, CutoffsError
from flashmesh.dataplane.target.model import PORT_ID_BASE, Host, Namespace, Port, Subsystem, Target
from flashmesh.dataplane.target.planner import Action, plan

NQN = naming.subsystem_nqn("fm-000000000001", 0, 0)
NQN2 = naming.subsystem_nqn("fm-000000000002", 0, 0)
FOREIGN = "nqn.2024-01.io.example:scratch"
HOST_A = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-000000000001"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-4000-8000-000000000002"
PORT = PORT_ID_BASE
KEY = "DHHC-1:00:c2VjcmV0LWtleS1vbmUtZm9yLXRlc3RzLW9ubHkxMjM0NTY3OA==:"


def namespace(device: str = "/dev/fm/a", nqn: str = NQN) -> Namespace:
    return Namespace(1, device, naming.namespace_uuid(nqn), naming.namespace_nguid(nqn))


def subsystem(nqn: str = NQN, hosts: tuple[str, ...] = (HOST_A,), **kw: object) -> Subsystem:
    base = Subsystem(nqn, "fm000000000001s0r0", False, frozenset(hosts), {1: namespace(nqn=nqn)})
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def port(subsystems: tuple[str, ...] = (NQN,), port_id: int = PORT, **kw: object) -> Port:
    base = Port(port_id, "tcp", "10.77.0.1", "4420", subsystems=frozenset(subsystems))
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def target(subs: list[Subsystem], ports: list[Port], hosts: tuple[str, ...] = (HOST_A,)) -> Target:
    return Target(
        {s.nqn: s for s in subs}, {p.port_id: p for p in ports}, {h: Host(h) for h in hosts}
    )


DESIRED = target([subsystem()], [port()])


def index(actions: list[Action], op: str, path_end: str, value: str | None = None) -> int:
    for i, a in enumerate(actions):
        if a.op == op and a.path.endswith(path_end) and (value is None or a.value == value):
            return i
    raise AssertionError(f"no {op} {path_end} in {[str(a) for a in actions]}")


def tree(tmp_path: Path, state: Target | None = None) -> FakeNvmet:
    fs = FakeNvmet(tmp_path)
    for d in ("subsystems", "ports", "hosts"):
        (tmp_path / d).mkdir(parents=True)
    if state is not None:
        apply(fs, plan(state, Target()))
    return fs


def converge(fs: FakeNvmet, desired: Target) -> None:
    apply(fs, plan(desired, observe(fs)))
    assert plan(desired, observe(fs)) == [], "a second plan must have nothing to do"


# --- ordering rules -----------------------------------------------------------------------


def test_a_fresh_export_builds_bottom_up() -> None:
    actions = plan(DESIRED, Target())
    assert index(actions, "mkdir", f"hosts/{HOST_A}") < index(
        actions, "link", f"allowed_hosts/{HOST_A}"
    )
    assert index(actions, "mkdir", f"subsystems/{NQN}") < index(actions, "write", "attr_serial")
    # namespace attributes before enable; the port links the subsystem last
    assert index(actions, "write", "namespaces/1/device_uuid") < index(
        actions, "write", "enable", "1"
    )
    assert index(actions, "write", "namespaces/1/device_nguid") < index(
        actions, "write", "enable", "1"
    )
    assert index(actions, "write", "addr_traddr") < index(
        actions, "link", f"{PORT}/subsystems/{NQN}"
    )
    assert index(actions, "write", "enable", "1") < index(
        actions, "link", f"{PORT}/subsystems/{NQN}"
    )


def test_namespace_attributes_change_only_while_disabled() -> None:
    moved = target([subsystem(namespaces={1: namespace("/dev/fm/b")})], [port()])
    actions = plan(moved, DESIRED)
    assert [str(a) for a in actions] == [
        f"write subsystems/{NQN}/namespaces/1/enable = 0",
        f"write subsystems/{NQN}/namespaces/1/device_path = /dev/fm/b",
        f"write subsystems/{NQN}/namespaces/1/enable = 1",
    ]


def test_stale_hosts_are_unlinked_and_cut_off_before_allowing_any_host() -> None:
    actions = plan(target([subsystem(hosts=(), allow_any_host=True)], [port()], hosts=()), DESIRED)
    unlink = index(actions, "unlink", f"allowed_hosts/{HOST_A}")
    assert actions[unlink - 1] == Action("fence", f"subsystems/{NQN}", HOST_A)
    assert actions[unlink + 1] == Action("disconnect", f"subsystems/{NQN}", HOST_A)
    assert unlink < index(actions, "write", "attr_allow_any_host", "1")
    assert index(actions, "rmdir", f"hosts/{HOST_A}") > unlink


def test_the_flag_is_cleared_before_hosts_are_linked() -> None:
    any_host = target([subsystem(hosts=(), allow_any_host=True)], [port()], hosts=())
    actions = plan(DESIRED, any_host)
    assert index(actions, "write", "attr_allow_any_host", "0") < index(
        actions, "link", f"allowed_hosts/{HOST_A}"
    )


def test_a_removed_host_loses_its_live_connections() -> None:
    both = target([subsystem(hosts=(HOST_A, HOST_B))], [port()], hosts=(HOST_A, HOST_B))
    actions = plan(DESIRED, both)
    assert [str(a) for a in actions] == [
        f"fence subsystems/{NQN} = {HOST_B}",
        f"unlink subsystems/{NQN}/allowed_hosts/{HOST_B}",
        f"disconnect subsystems/{NQN} = {HOST_B}",
        f"rmdir hosts/{HOST_B}",
    ]


def test_a_host_still_being_cut_off_is_disconnected_again() -> None:
    """Unlinked by a pass that died before the cut-off: no longer allowed, but recorded (or
    listed by nvmet's debugfs) as still connected."""
    left = target([subsystem(cutting_off=frozenset({HOST_B}))], [port()])
    assert [str(a) for a in plan(DESIRED, left)] == [f"disconnect subsystems/{NQN} = {HOST_B}"]


def test_a_kept_host_may_not_connect_again_but_keeps_its_controllers() -> None:
    """A disputed host NQN (claimed twice, its key missing) is unlinked, never cut off."""
    both = target([subsystem(hosts=(HOST_A, HOST_B))], [port()], hosts=(HOST_A, HOST_B))
    kept = target([subsystem(kept_hosts=frozenset({HOST_B}))], [port()])
    assert [str(a) for a in plan(kept, both)] == [
        f"fence subsystems/{NQN} = {HOST_B}",
        f"unlink subsystems/{NQN}/allowed_hosts/{HOST_B}",
        f"rmdir hosts/{HOST_B}",
    ]
    seen = target([subsystem(cutting_off=frozenset({HOST_B}))], [port()])
    assert plan(kept, seen) == [], "a kept host's live controllers are never cut"
    # Unpublished while kept: no longer the volume's host, so cut off like any other.
    assert [str(a) for a in plan(DESIRED, seen)] == [f"disconnect subsystems/{NQN} = {HOST_B}"]


def test_a_host_rekeyed_as_it_leaves_a_subsystem_is_still_cut_off() -> None:
    """Turning authentication off remakes keyed host entries (unlinked everywhere first); a
    host that leaves one subsystem in the same plan is recorded and cut off there."""
    keyed = target(
        [subsystem(hosts=(HOST_A, HOST_B)), subsystem(NQN2, hosts=(HOST_B,))],
        [port(subsystems=(NQN, NQN2))], hosts=(),
    )  # fmt: skip
    keyed.hosts.update({HOST_A: Host(HOST_A, KEY), HOST_B: Host(HOST_B, KEY)})
    wanted = target(
        [subsystem(), subsystem(NQN2, hosts=(HOST_B,))], [port(subsystems=(NQN, NQN2))],
        hosts=(HOST_A, HOST_B),
    )  # fmt: skip
    actions = [str(a) for a in plan(wanted, keyed)]
    fence = actions.index(f"fence subsystems/{NQN} = {HOST_B}")
    assert fence < actions.index(f"unlink subsystems/{NQN}/allowed_hosts/{HOST_B}")
    assert f"disconnect subsystems/{NQN} = {HOST_B}" in actions
    assert f"disconnect subsystems/{NQN2} = {HOST_B}" not in actions
    assert f"link subsystems/{NQN2}/allowed_hosts/{HOST_B} = hosts/{HOST_B}" in actions


def test_a_subsystem_is_unlinked_from_ports_and_emptied_before_removal() -> None:
    actions = plan(target([], [port(subsystems=())], hosts=()), DESIRED)
    assert [str(a) for a in actions] == [
        f"unlink ports/{PORT}/subsystems/{NQN}",
        f"unlink subsystems/{NQN}/allowed_hosts/{HOST_A}",
        f"write subsystems/{NQN}/namespaces/1/enable = 0",
        f"rmdir subsystems/{NQN}/namespaces/1",
        f"rmdir subsystems/{NQN}",
        f"rmdir hosts/{HOST_A}",
    ]


def test_a_port_changes_address_only_with_no_subsystem_linked() -> None:
    actions = plan(target([subsystem()], [port(traddr="10.77.1.1")]), DESIRED)
    assert [str(a) for a in actions] == [
        f"unlink ports/{PORT}/subsystems/{NQN}",
        f"write ports/{PORT}/addr_traddr = 10.77.1.1",
        f"link ports/{PORT}/subsystems/{NQN} = subsystems/{NQN}",
    ]


def test_ana_groups_are_made_and_set() -> None:
    states = {1: "optimized", 2: "inaccessible"}
    actions = plan(target([subsystem()], [port(ana_states=states)]), DESIRED)
    assert [str(a) for a in actions] == [
        f"mkdir ports/{PORT}/ana_groups/2",
        f"write ports/{PORT}/ana_groups/2/ana_state = inaccessible",
    ]


def test_keys_are_written_and_rotated_but_never_shown() -> None:
    keyed = Target(DESIRED.subsystems, DESIRED.ports, {HOST_A: Host(HOST_A, dhchap_key=KEY)})
    actions = plan(keyed, DESIRED)
    assert actions == [Action("write", f"hosts/{HOST_A}/dhchap_key", KEY, secret=True)]
    assert KEY not in str(actions[0]) and "<redacted>" in str(actions[0])
    rotated = Target(DESIRED.subsystems, DESIRED.ports, {HOST_A: Host(HOST_A, KEY + "x")})
    assert [a.value for a in plan(rotated, keyed)] == [KEY + "x"]


def test_a_key_no_longer_wanted_goes_with_its_host_entry() -> None:
    # The kernel refuses an empty key: the entry is unlinked, removed and made again.
    keyed = Target(DESIRED.subsystems, DESIRED.ports, {HOST_A: Host(HOST_A, dhchap_key=KEY)})
    assert [str(a) for a in plan(DESIRED, keyed)] == [
        f"unlink subsystems/{NQN}/allowed_hosts/{HOST_A}",
        f"rmdir hosts/{HOST_A}",
        f"mkdir hosts/{HOST_A}",
        f"link subsystems/{NQN}/allowed_hosts/{HOST_A} = hosts/{HOST_A}",
    ]
    # Linked by another tool's subsystem too: the entry cannot go, so it keeps its key.
    foreign = Subsystem(FOREIGN, "x", False, frozenset({HOST_A}), {1: namespace("/dev/sdz")})
    shared = dataclasses.replace(keyed, subsystems={**keyed.subsystems, FOREIGN: foreign})
    assert plan(DESIRED, shared) == []


def test_turning_keys_off_converges_on_the_fake_kernel(tmp_path: Path) -> None:
    keyed = Target(DESIRED.subsystems, DESIRED.ports, {HOST_A: Host(HOST_A, dhchap_key=KEY)})
    fs = tree(tmp_path, keyed)
    assert observe(fs).hosts[HOST_A].dhchap_key == KEY
    converge(fs, DESIRED)
    assert observe(fs) == DESIRED


def test_what_is_not_flashmeshs_is_left_alone() -> None:
    foreign_sub = Subsystem(FOREIGN, "x", True, frozenset(), {1: namespace("/dev/sdz")})
    foreign_port = port(subsystems=(FOREIGN, NQN), port_id=1)
    observed = target([foreign_sub, subsystem()], [foreign_port], hosts=(HOST_A, HOST_B))
    actions = plan(target([], []), observed)
    touched = {a.path for a in actions}
    assert f"ports/1/subsystems/{NQN}" in touched  # our link on their port goes
    assert not any(FOREIGN in path for path in touched)
    assert "ports/1" not in touched


def test_a_host_entry_flashmesh_never_linked_is_left_alone() -> None:
    # Another tool makes hosts/<nqn> and links it a moment later: the agent must not race it.
    observed = target([subsystem()], [port()], hosts=(HOST_A, HOST_B))
    assert plan(DESIRED, observed) == []
    removed = {a.path for a in plan(target([], [], hosts=()), observed) if a.op == "rmdir"}
    assert f"hosts/{HOST_A}" in removed  # FlashMesh linked it: it goes with the subsystem
    assert f"hosts/{HOST_B}" not in removed


def test_only_flashmesh_names_and_ports_can_be_desired() -> None:
    with pytest.raises(ValueError, match="ids from"):
        plan(target([subsystem()], [port(port_id=1)]), Target())
    with pytest.raises(ValueError, match="only its own NQNs"):
        plan(target([subsystem(nqn=FOREIGN)], []), Target())


# --- the writer and reader against a temporary tree ------------------------------------


def test_applying_a_plan_then_planning_again_has_nothing_to_do(tmp_path: Path) -> None:
    fs = tree(tmp_path)
    converge(fs, DESIRED)
    seen = observe(fs)
    assert seen.subsystems[NQN].namespaces[1].device_uuid == naming.namespace_uuid(NQN)
    assert seen.ports[PORT].subsystems == {NQN}
    assert (tmp_path / f"subsystems/{NQN}/allowed_hosts/{HOST_A}").is_symlink()


@pytest.mark.parametrize(
    "change",
    [
        target([subsystem(), subsystem(NQN2, hosts=())], [port(subsystems=(NQN, NQN2))]),
        target([subsystem(hosts=(), allow_any_host=True)], [port()], hosts=()),
        target([subsystem(namespaces={1: namespace("/dev/fm/b")})], [port(traddr="10.77.1.1")]),
        target([subsystem(hosts=(HOST_B,))], [port()], hosts=(HOST_B,)),
        target([subsystem()], [port(ana_states={1: "optimized", 2: "inaccessible"})]),
        target([], [], hosts=()),
    ],
    ids=[
        "add a subsystem",
        "allow any host",
        "move namespace and port",
        "swap hosts",
        "add an ANA group",
        "remove all",
    ],
)
def test_every_change_converges_on_the_fake_kernel(tmp_path: Path, change: Target) -> None:
    fs = tree(tmp_path, DESIRED)
    converge(fs, change)
    converge(fs, target([], [], hosts=()))  # and everything can be taken away again
    assert observe(fs) == Target()


def test_a_tree_left_half_made_by_a_crash_converges(tmp_path: Path) -> None:
    full = plan(DESIRED, Target())
    for cut in range(len(full)):
        fs = tree(tmp_path / f"cut{cut}")
        apply(fs, full[:cut])  # the agent died here
        converge(fs, DESIRED)


def test_a_refusal_names_the_operation_and_stops(tmp_path: Path) -> None:
    fs = tree(tmp_path, DESIRED)
    bad = [Action("write", f"subsystems/{NQN}/namespaces/1/device_path", "/dev/x")]
    with pytest.raises(ConfigfsError, match="device_path = /dev/x: Device or resource busy"):
        apply(fs, bad)


# --- one refusal, one object ---------------------------------------------------------------


class Refusing(FakeNvmet):
    """The fake kernel refusing writes to the attributes named (a namespace whose device
    vanished, a key the kernel will not take), as the kernel does: EINVAL."""

    def __init__(self, root: Path, refused: tuple[str, ...]) -> None:
        super().__init__(root)
        self.refused = refused

    def write(self, rel: str, value: str) -> None:
        if rel.endswith(self.refused):
            raise OSError(22, "Invalid argument")
        super().write(rel, value)


def refusing(tmp_path: Path, state: Target | None, *refused: str) -> Refusing:
    tree(tmp_path, state)
    return Refusing(tmp_path, refused)


def test_a_subsystem_refused_fails_alone_and_the_others_are_exported(tmp_path: Path) -> None:
    both = target([subsystem(), subsystem(NQN2)], [port((NQN, NQN2))])
    fs = refusing(tmp_path, None, f"{NQN}/namespaces/1/enable")
    failures = apply_each(fs, plan(both, observe(fs)))
    assert list(failures.subsystems) == [NQN] and not failures.hosts and not failures.ports
    assert "enable = 1: Invalid argument" in failures.subsystems[NQN]
    seen = observe(fs)
    assert seen.subsystems[NQN2] == both.subsystems[NQN2]
    assert seen.ports[PORT].subsystems == {NQN2}  # the refused one is not linked to a port
    # apply() as before: the first refusal stops the plan.
    fs2 = refusing(tmp_path / "stop", None, f"{NQN}/namespaces/1/enable")
    with pytest.raises(ConfigfsError):
        apply(fs2, plan(both, observe(fs2)))
    assert NQN2 not in observe(fs2).subsystems


def test_a_host_whose_key_is_refused_is_linked_nowhere_and_the_others_are_served(
    tmp_path: Path,
) -> None:
    keyed = Target(
        {NQN: subsystem(hosts=(HOST_A, HOST_B))},
        {PORT: port()},
        {HOST_A: Host(HOST_A, dhchap_key=KEY), HOST_B: Host(HOST_B, dhchap_key=KEY)},
    )
    fs = refusing(tmp_path, None, f"hosts/{HOST_A}/dhchap_key")
    failures = apply_each(fs, plan(keyed, observe(fs)))
    assert list(failures.hosts) == [HOST_A]
    assert f"skipped: host {HOST_A} failed" in failures.subsystems[NQN]
    seen = observe(fs)
    # Linked without its key, HOST_A could connect unauthenticated: it is not linked.
    assert seen.subsystems[NQN].allowed_hosts == {HOST_B}
    assert seen.ports[PORT].subsystems == {NQN}


def test_a_failed_host_never_holds_up_taking_access_away(tmp_path: Path) -> None:
    before = target([subsystem(hosts=(HOST_A, HOST_B))], [port()], hosts=(HOST_A, HOST_B))
    after = Target(
        {NQN: subsystem(hosts=(HOST_A,)), NQN2: subsystem(NQN2, hosts=(HOST_B,))},
        {PORT: port((NQN, NQN2))},
        {HOST_A: Host(HOST_A), HOST_B: Host(HOST_B, dhchap_key=KEY)},
    )
    fs = refusing(tmp_path, before, f"hosts/{HOST_B}/dhchap_key")
    failures = apply_each(fs, plan(after, observe(fs)))
    assert HOST_B in failures.hosts
    seen = observe(fs)
    assert seen.subsystems[NQN].allowed_hosts == {HOST_A}  # HOST_B's access was taken away
    assert seen.subsystems[NQN2].allowed_hosts == frozenset()  # and not given where refused


# --- cut-offs that outlive the agent ------------------------------------------------------

BOTH = target([subsystem(hosts=(HOST_A, HOST_B))], [port()], hosts=(HOST_A, HOST_B))


def test_a_pass_killed_between_unlink_and_cut_off_is_finished_by_the_next(
    tmp_path: Path,
) -> None:
    fs = tree(tmp_path / "nvmet", BOTH)
    cutoffs = Cutoffs(tmp_path / "run" / "cutoffs.json")
    actions = plan(DESIRED, observe(fs, cutoffs))
    killed = actions[: index(actions, "disconnect", NQN)]
    apply(fs, killed, cutoffs)  # the agent died here: HOST_B unlinked, still connected
    seen = observe(fs, cutoffs)
    assert seen.subsystems[NQN].allowed_hosts == {HOST_A}
    assert seen.subsystems[NQN].cutting_off == {HOST_B}
    again = plan(DESIRED, seen)
    assert Action("disconnect", f"subsystems/{NQN}", HOST_B) in again
    apply(fs, again, cutoffs)
    assert observe(fs, cutoffs).subsystems[NQN].cutting_off == frozenset()
    assert cutoffs.pending() == {}


def test_a_cut_off_is_recorded_before_the_unlink_and_cleared_after_it(tmp_path: Path) -> None:
    fs = tree(tmp_path / "nvmet", BOTH)
    cutoffs = Cutoffs(tmp_path / "run" / "cutoffs.json")
    actions = plan(DESIRED, observe(fs, cutoffs))
    apply(fs, actions[: index(actions, "fence", NQN) + 1], cutoffs)
    assert cutoffs.pending() == {NQN: {HOST_B}}
    assert observe(fs, cutoffs).subsystems[NQN].allowed_hosts == {HOST_A, HOST_B}
    converge_with(fs, DESIRED, cutoffs)
    assert cutoffs.pending() == {}


def test_a_removed_subsystem_takes_its_cut_offs_with_it(tmp_path: Path) -> None:
    fs = tree(tmp_path / "nvmet", BOTH)
    cutoffs = Cutoffs(tmp_path / "run" / "cutoffs.json")
    cutoffs.add(NQN, HOST_B)
    converge_with(fs, target([], [], hosts=()), cutoffs)
    assert cutoffs.pending() == {}


def test_debugfs_names_the_hosts_still_connected(tmp_path: Path) -> None:
    """Where nvmet has its debugfs (kernel >= 6.9), a connected host that is not allowed is
    being cut off whatever was recorded."""
    fs = tree(tmp_path / "nvmet", DESIRED)
    debugfs = tmp_path / "debug"
    for ctrl, host in (("ctrl1", HOST_A), ("ctrl2", HOST_B)):
        (debugfs / NQN / ctrl).mkdir(parents=True)
        (debugfs / NQN / ctrl / "hostnqn").write_text(host + "\n")
    seen = observe(fs, Cutoffs(tmp_path / "none.json"), debugfs)
    assert seen.subsystems[NQN].cutting_off == {HOST_B}
    # The cut-off ends that host's controller alone, and no port link changes.
    apply(fs, plan(DESIRED, seen), Cutoffs(tmp_path / "none.json"), debugfs)
    assert (debugfs / NQN / "ctrl2" / "state").read_text() == "fatal"
    assert not (debugfs / NQN / "ctrl1" / "state").exists()
    assert observe(fs).ports[PORT].subsystems == {NQN}


def converge_with(fs: FakeNvmet, desired: Target, cutoffs: Cutoffs) -> None:
    apply(fs, plan(desired, observe(fs, cutoffs)), cutoffs)
    assert plan(desired, observe(fs, cutoffs)) == [], "a second plan must have nothing to do"


def test_an_unreadable_record_stops_the_plan_instead_of_forgetting_cut_offs(
    tmp_path: Path,
) -> None:
    record = tmp_path / "cutoffs.json"
    record.write_text("[1, 2]")
    with pytest.raises(CutoffsError, match="unreadable"):
        Cutoffs(record).pending()
