"""Reading nvmet's configfs into the model, and applying a plan to it.

Everything goes through a small file-system adapter rooted at the nvmet folder
(/sys/kernel/config/nvmet on a node), so the same code runs against a temporary tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from flashmesh.dataplane import faults
from flashmesh.dataplane.target.fencing import (
    NVMET_DEBUGFS,
    Cutoffs,
    NoCutoffs,
    connected_hosts,
    controllers,
)
from flashmesh.dataplane.target.model import Host, Namespace, Port, Subsystem, Target
from flashmesh.dataplane.target.planner import Action, subsystem_path

log = logging.getLogger(__name__)

NVMET_ROOT = Path("/sys/kernel/config/nvmet")


class ConfigfsError(RuntimeError):
    def __init__(self, action: Action, error: OSError) -> None:
        super().__init__(f"{action}: {error.strerror or error}")
        self.action = action
        self.errno = error.errno


class Fs:
    """Plain file operations under a root; configfs itself supplies its semantics."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, rel: str) -> Path:
        return self.root / rel

    def mkdir(self, rel: str) -> None:
        self.path(rel).mkdir()

    def rmdir(self, rel: str) -> None:
        self.path(rel).rmdir()

    def write(self, rel: str, value: str) -> None:
        with self.path(rel).open("w") as f:
            f.write(value)

    def link(self, rel: str, target_rel: str) -> None:
        self.path(rel).symlink_to(self.path(target_rel))

    def unlink(self, rel: str) -> None:
        self.path(rel).unlink()

    def read(self, rel: str) -> str | None:
        with contextlib.suppress(OSError):
            return self.path(rel).read_text().strip()
        return None

    def names(self, rel: str) -> list[str]:
        with contextlib.suppress(OSError):
            return sorted(os.listdir(self.path(rel)))
        return []


def observe(fs: Fs, cutoffs: Cutoffs | None = None, debugfs: Path = NVMET_DEBUGFS) -> Target:
    """The whole nvmet tree as the model; each subsystem's hosts still being cut off from
    nvmet's debugfs (where the kernel has it) and the recorded cut-offs not done."""
    target = Target()
    pending = (cutoffs or NoCutoffs()).pending()
    for nqn in fs.names("subsystems"):
        base = f"subsystems/{nqn}"
        namespaces = {}
        for nsid in fs.names(f"{base}/namespaces"):
            ns = f"{base}/namespaces/{nsid}"
            namespaces[int(nsid)] = Namespace(
                nsid=int(nsid),
                device_path=_null(fs.read(f"{ns}/device_path")),
                device_uuid=fs.read(f"{ns}/device_uuid") or "",
                device_nguid=fs.read(f"{ns}/device_nguid") or "",
                ana_grpid=int(fs.read(f"{ns}/ana_grpid") or 1),
                enable=fs.read(f"{ns}/enable") == "1",
            )
        allowed = frozenset(fs.names(f"{base}/allowed_hosts"))
        connected = connected_hosts(nqn, debugfs) or frozenset()
        target.subsystems[nqn] = Subsystem(
            nqn=nqn,
            serial=fs.read(f"{base}/attr_serial") or "",
            allow_any_host=fs.read(f"{base}/attr_allow_any_host") == "1",
            allowed_hosts=allowed,
            namespaces=namespaces,
            cutting_off=(connected | pending.get(nqn, frozenset())) - allowed,
        )
    for port_id in fs.names("ports"):
        base = f"ports/{port_id}"
        target.ports[int(port_id)] = Port(
            port_id=int(port_id),
            trtype=fs.read(f"{base}/addr_trtype") or "",
            traddr=fs.read(f"{base}/addr_traddr") or "",
            trsvcid=fs.read(f"{base}/addr_trsvcid") or "",
            adrfam=fs.read(f"{base}/addr_adrfam") or "",
            subsystems=frozenset(fs.names(f"{base}/subsystems")),
            ana_states={
                int(g): fs.read(f"{base}/ana_groups/{g}/ana_state") or ""
                for g in fs.names(f"{base}/ana_groups")
            },
        )
    for nqn in fs.names("hosts"):
        target.hosts[nqn] = Host(
            nqn=nqn,
            dhchap_key=_null(fs.read(f"hosts/{nqn}/dhchap_key")) or None,
            dhchap_ctrl_key=_null(fs.read(f"hosts/{nqn}/dhchap_ctrl_key")) or None,
        )
    return target


def _null(value: str | None) -> str:
    return "" if value in (None, "(null)") else str(value)


def apply(
    fs: Fs, actions: list[Action], cutoffs: Cutoffs | None = None, debugfs: Path = NVMET_DEBUGFS
) -> None:
    """Applies a plan in order; stops at the first refusal, naming the operation. What was
    applied stays: the next plan starts from there. Cut-offs are recorded in `cutoffs`
    (see fencing.py): a `fence` adds one, a `disconnect` that returns ends it."""
    cutoffs = cutoffs or NoCutoffs()
    for action in actions:
        _do(fs, action, cutoffs, debugfs)


@dataclass
class Failures:
    """What a plan applied object by object could not do: per subsystem NQN (its own
    refusal, or a step skipped for a port or host that failed), per host NQN, per port."""

    subsystems: dict[str, str] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)
    ports: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.subsystems or self.hosts or self.ports)


def apply_each(
    fs: Fs, actions: list[Action], cutoffs: Cutoffs | None = None, debugfs: Path = NVMET_DEBUGFS
) -> Failures:
    """Applies a plan object by object: a refusal fails the subsystem, host or port it
    concerns, whose later steps are skipped, and every other object's steps go on. One
    volume's missing device or one host's bad key must not freeze a node's exports.

    A step that needs a failed object is skipped and charged to its subsystem: a host whose
    key could not be written is linked nowhere (unlinked it could connect without a key);
    a port that could not be made carries no subsystem. Such a subsystem's other steps go
    on, so its other hosts are served."""
    cutoffs = cutoffs or NoCutoffs()
    failures = Failures()
    failed: dict[tuple[str, str], str] = {}
    for action in actions:
        owner, needs = _objects(action)
        if owner in failed:
            continue
        blocked = next((n for n in needs if n in failed), None)
        if blocked is not None:
            failures.subsystems.setdefault(
                owner[1], f"{action} skipped: {blocked[0]} {blocked[1]} failed: {failed[blocked]}"
            )
            continue
        try:
            _do(fs, action, cutoffs, debugfs)
        except ConfigfsError as exc:
            log.warning("nvmet: %s", exc)
            failed[owner] = str(exc)
            getattr(failures, f"{owner[0]}s")[owner[1]] = str(exc)
    return failures


def _objects(action: Action) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """The object an action changes, as (kind, name), and the objects it needs. Only a
    link needs its target: taking access away (unlink, fence, disconnect) never waits for
    anything."""
    parts = action.path.split("/")
    if parts[0] == "ports" and len(parts) == 4 and parts[2] == "subsystems":
        return ("subsystem", parts[3]), [("port", parts[1])] if action.op == "link" else []
    if parts[0] in ("ports", "hosts"):
        return (parts[0][:-1], parts[1]), []
    if len(parts) == 4 and parts[2] == "allowed_hosts" and action.op == "link":
        return ("subsystem", parts[1]), [("host", parts[3])]
    return ("subsystem", parts[1]), []


def _do(fs: Fs, action: Action, cutoffs: Cutoffs, debugfs: Path) -> None:
    log.info("nvmet: %s", action)
    faults.before_change(str(action))
    try:
        if action.op == "mkdir":
            fs.mkdir(action.path)
        elif action.op == "rmdir":
            fs.rmdir(action.path)
            if action.path.count("/") == 1 and action.path.startswith("subsystems/"):
                cutoffs.forget(action.path.removeprefix("subsystems/"))
        elif action.op == "write":
            fs.write(action.path, action.value)
        elif action.op == "link":
            fs.link(action.path, action.value)
        elif action.op == "unlink":
            fs.unlink(action.path)
        elif action.op == "fence":
            cutoffs.add(action.path.removeprefix("subsystems/"), action.value)
        else:
            nqn = action.path.removeprefix("subsystems/")
            log.info("nvmet: %s", disconnect(fs, nqn, action.value, debugfs))
            cutoffs.done(nqn, action.value)
    except OSError as exc:
        raise ConfigfsError(action, exc) from exc


def disconnect(fs: Fs, nqn: str, host: str, debugfs: Path = NVMET_DEBUGFS) -> str:
    """Ends a host's live controllers on a subsystem; says how.

    With nvmet's debugfs, each of the host's controllers gets a fatal error and goes away
    alone. Without it, the subsystem is unlinked from its ports and linked again, which
    drops every controller of that subsystem; the hosts still allowed reconnect by
    themselves (within their reconnect delay), the removed one is refused."""
    found = controllers(nqn, debugfs)
    if found is not None:
        ended = [ctrl for ctrl, hostnqn in found.items() if hostnqn == host]
        for ctrl in ended:
            (ctrl / "state").write_text("fatal")
        return f"ended {len(ended)} controller(s) of {host} through debugfs"
    relinked = 0
    for port_id in fs.names("ports"):
        link = f"ports/{port_id}/subsystems/{nqn}"
        if fs.path(link).is_symlink():
            fs.unlink(link)
            fs.link(link, subsystem_path(nqn))
            relinked += 1
    return f"relinked {nqn} on {relinked} port(s) to drop {host}"


def revalidate_size(fs: Fs, nqn: str) -> None:
    """Tells an enabled namespace to read its grown device's size again (nvmet then sends
    hosts a namespace-changed event); a namespace not exported yet reads it on enable."""
    path = f"{subsystem_path(nqn)}/namespaces/1/revalidate_size"
    faults.before_change(f"write {path}")
    with contextlib.suppress(FileNotFoundError):
        fs.write(path, "1")
