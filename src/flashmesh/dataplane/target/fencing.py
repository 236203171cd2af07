"""Cut-offs that outlive the agent: a host removed from a subsystem is recorded before the
first step that removes it, and the record goes only once its live controllers are ended.

nvmet checks allowed hosts only when a host connects, so unlinking a host lets its live
controllers go on writing; the cut-off is the step after. An agent killed between the two
(a rollout, an OOM kill) would, on its next pass, see the host no longer allowed and never
end its controllers, while ControllerUnpublish reported it gone. With the record, the next
pass sees the host as still being cut off and ends its controllers again, and the segment's
status names it until then.

Kernels with nvmet's debugfs (6.9 and later, when built with it) list each controller with
its host NQN: there the kernel's own list says which removed hosts are still connected, and
the record only adds what was being cut off when the agent stopped. Debian 12's 6.12 kernel
is built without it: the record is then all there is, and the cut-off (a relink of the
subsystem on its ports) is redone until it completes.

The record lives on a tmpfs (/run): it survives the agent, and a reboot, which ends every
controller, clears it with them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

CUTOFFS = Path("/run/flashmesh/cutoffs.json")
# nvmet's debugfs (kernel >= 6.9): <nqn>/ctrl<id>/hostnqn per controller; writing "fatal"
# to a controller's state ends that one controller.
NVMET_DEBUGFS = Path("/sys/kernel/debug/nvmet")


class CutoffsError(RuntimeError):
    pass


class Cutoffs:
    """The persisted set of (subsystem NQN, host NQN) cut-offs not yet done."""

    def __init__(self, path: Path = CUTOFFS) -> None:
        self.path = path

    def pending(self) -> dict[str, frozenset[str]]:
        """Subsystem NQN -> the hosts being cut off from it (or kept: see the planner)."""
        try:
            data = json.loads(self.path.read_text())
            return {str(nqn): frozenset(map(str, hosts)) for nqn, hosts in data.items() if hosts}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            # Written by rename, so never torn; if unreadable all the same, no cut-off may be
            # taken as done: nothing is planned until a person looks.
            raise CutoffsError(
                f"{self.path}: {exc}: the record of hosts being cut off is unreadable; check "
                "the subsystems' hosts by hand (nvmet configfs), then remove the file"
            ) from exc

    def add(self, nqn: str, host: str) -> None:
        data = self.pending()
        self._save({**data, nqn: data.get(nqn, frozenset()) | {host}})

    def done(self, nqn: str, host: str) -> None:
        data = self.pending()
        if host in data.get(nqn, frozenset()):
            self._save({**data, nqn: data[nqn] - {host}})

    def forget(self, nqn: str) -> None:
        """A subsystem removed: unlinking it from its ports ended all its controllers."""
        data = self.pending()
        if nqn in data:
            self._save({k: v for k, v in data.items() if k != nqn})

    def _save(self, data: dict[str, frozenset[str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({k: sorted(v) for k, v in sorted(data.items()) if v}, indent=1)
        temp = self.path.with_suffix(".tmp")
        with temp.open("w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        temp.replace(self.path)


class NoCutoffs(Cutoffs):
    """Nothing recorded (a one-shot plan on a scratch tree, where no host ever connected)."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"))

    def pending(self) -> dict[str, frozenset[str]]:
        return {}

    def _save(self, data: dict[str, frozenset[str]]) -> None:
        pass


def controllers(nqn: str, debugfs: Path = NVMET_DEBUGFS) -> dict[Path, str] | None:
    """Each controller's folder on the subsystem and its host NQN, from nvmet's debugfs;
    None where the kernel does not tell."""
    folder = debugfs / nqn
    if not folder.is_dir():
        return None
    found = {}
    for ctrl in sorted(folder.glob("ctrl*")):
        with contextlib.suppress(OSError):
            found[ctrl] = (ctrl / "hostnqn").read_text().strip()
    return found


def connected_hosts(nqn: str, debugfs: Path = NVMET_DEBUGFS) -> frozenset[str] | None:
    """The host NQNs with a controller on the subsystem; None where the kernel does not
    tell."""
    found = controllers(nqn, debugfs)
    return None if found is None else frozenset(found.values())
