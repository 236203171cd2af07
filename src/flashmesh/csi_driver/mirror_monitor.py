"""The node plugin's watch over the mirrored volumes it has staged.

A pass runs as soon as md notifies a change of one of the staged arrays (a member failed,
a resync ended: sysfs wakes the monitor, no polling), and every 10 s otherwise (to
reconnect a replica whose storage node came back, and show a resync's progress). A
member md failed (its storage node or path went down) is first recorded in the Volume's
status, then removed from the array; a replica whose subsystem is reachable again is
connected if need be and re-added, so md resyncs what the bitmap says it missed; and the
Volume's replica records and ReplicasInSync condition follow what md reports.

It also watches striped volumes, for one fault the kernel does not heal: a segment whose
controller it gave up on (a storage node away for longer than the class's ctrlLossTmo)
is gone for good, and the stripe's table still names its dead device. The monitor
connects such a segment again once it is reachable and reloads the stripe's table with
the new device, so the volume serves again without NodeStage (I/O issued while the
segment was gone has failed; a single-segment volume, with no table to reload, is left
for its pod to be restarted). The volume's lock is taken for each pass that acts, so a
pass never races a CSI call on it (a busy volume waits for the next pass)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flashmesh.core import mirrors, params
from flashmesh.csi_driver.errors import CsiError
from flashmesh.dataplane import mirror
from flashmesh.dataplane.initiator import sysfs

if TYPE_CHECKING:
    from flashmesh.csi_driver.node import Node, Staged

log = logging.getLogger(__name__)


class MirrorMonitor:
    def __init__(self, node: Node, interval: float = 10.0, reconnect_every: float = 10.0) -> None:
        self.node, self.interval, self.reconnect_every = node, interval, reconnect_every
        self._tried: dict[str, float] = {}  # nqn -> when a reconnect was last tried
        # A pass that could not finish a volume (its record not written: the API server
        # unreachable; its lock held by a CSI call) is tried again this soon.
        self.retry_after = min(2.0, interval)
        self._unfinished = False

    def run(self, stop: threading.Event) -> None:
        arrays: list[str] = []
        while not stop.is_set():
            wait = self.retry_after if self._unfinished else self.interval
            if arrays:
                mirror.wait_for_change(arrays, wait)  # md's notice, or the wait
            else:
                stop.wait(wait)
            if stop.is_set():
                return
            arrays = self.pass_once()

    def start(self) -> threading.Event:
        stop = threading.Event()
        threading.Thread(target=self.run, args=(stop,), name="mirror-monitor", daemon=True).start()
        return stop

    def pass_once(self) -> list[str]:
        """Checks every staged mirror; returns the md arrays seen, to wait on."""
        arrays: list[str] = []
        self._unfinished = False
        for path in sorted(self.node.state_dir.glob("*.json")):
            vid = path.stem
            try:
                found = self.node.load(vid)
                if found is not None and not found.md and found.dm and self._lost(found):
                    with self.node.locks.hold(vid, background=True):
                        staged = self.node.load(vid)
                        if staged is not None and staged.dm:
                            self.restripe(vid, staged)
                if found is None or not found.md:
                    continue  # not mirrored: never take its lock (a CSI call would get ABORTED)
                arrays += found.md
                with self.node.locks.hold(vid, background=True):
                    staged = self.node.load(vid)
                    if staged is not None and staged.md:
                        self.check(vid, staged)
            except CsiError:
                self._unfinished = True  # a CSI call holds the volume: look again soon
            except Exception:
                self._unfinished = True  # e.g. its record not written: retried soon
                log.exception("mirror monitor: volume %s", vid)
        return arrays

    def check(self, vid: str, staged: Staged) -> None:
        runner = self.node.runner
        self._record_failures(vid, staged)
        for index, name in enumerate(staged.md):
            state = mirror.array_state(name)
            if state is None:
                continue
            if mirrors.FAULTY in state.members.values():
                log.warning("volume %s: md failed a member of %s; removing it", vid, name)
                mirror.remove_failed(runner, name)
                state = mirror.array_state(name) or state
            for nqn, (i, replica) in sorted(staged.members.items()):
                if i != index:
                    continue
                device = self._device(vid, nqn, staged)
                if device is None or Path(device).name in state.members:
                    continue
                if not any(s == "live" for *_, s in sysfs.path_states(nqn)):
                    continue
                log.info("volume %s: replica %d of segment %d is back; re-adding", vid, replica, i)
                try:
                    mirror.re_add(runner, name, device)
                except mirror.MirrorError as exc:
                    log.warning("volume %s: %s", vid, exc)
        if self.node.replica_status is not None:
            _, volume = self.node.replica_status.read(vid)
            self.node.record_replicas(vid, staged, volume)

    def _record_failures(self, vid: str, staged: Staged) -> None:
        """A member md failed goes into the Volume's records before anything else is done
        (the window in which only this node knows a replica is behind)."""
        if self.node.replica_status is None:
            return
        seen = time.monotonic()
        if not any(
            (state := mirror.array_state(name)) and mirrors.FAULTY in state.members.values()
            for name in staged.md
        ):
            return
        _, volume = self.node.replica_status.read(vid)
        self.node.record_replicas(vid, staged, volume)
        log.warning(
            "volume %s: md failed a member; the degrade was recorded in the Volume's status "
            "%.3f s after the monitor saw it", vid, time.monotonic() - seen,
        )  # fmt: skip

    @staticmethod
    def _lost(staged: Staged) -> bool:
        """Whether a segment of this stripe has no namespace device (its controller was
        given up); read from sysfs, no process and no lock."""
        return bool(staged.segments) and not all(sysfs.namespace_device(nqn) for nqn in staged.nqns)

    def restripe(self, vid: str, staged: Staged) -> None:
        """Every lost segment connected again, then the stripe's table reloaded over the
        devices as they are now (a reconnected segment has a new device)."""
        devices = []
        for nqn in staged.nqns:
            device = self._device(vid, nqn, staged)
            if device is None:
                return  # still away: tried again after reconnect_every
            devices.append(device)
        log.warning("volume %s: its segments are connected again; reloading its stripe", vid)
        self.node.restripe(vid, devices)

    def _device(self, vid: str, nqn: str, staged: Staged) -> str | None:
        """The replica's block device; connected again (at most every reconnect_every
        seconds) when its controller is gone, e.g. after its ctrl_loss_tmo ran out."""
        found = sysfs.namespace_device(nqn)
        if found:
            return f"/dev/{Path(found).name}"
        if time.monotonic() - self._tried.get(nqn, float("-inf")) < self.reconnect_every:
            return None
        self._tried[nqn] = time.monotonic()
        seg = next((s for s in staged.segments if s["nqn"] == nqn), None)
        if seg is None:
            return None
        chosen = params.from_context(staged.context)
        wanted = staged.context.get("dhchap") == "true"
        try:
            secret = self.node.secret(wanted, {})
            return self.node.connect(vid, nqn, seg["endpoints"], chosen, secret)
        except CsiError as exc:
            log.info("volume %s: replica %s still unreachable: %s", vid, nqn, exc)
            return None
