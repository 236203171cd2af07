"""The NVMe-oF host side: connect to a segment's subsystem (idempotently, with the
StorageClass's timeouts and an optional DH-HMAC-CHAP key), find its block device, rescan it
after it grew, disconnect.

A connect is written to /dev/nvme-fabrics as the kernel's option string, as nvme-cli does
itself: the key never appears on a command line (where /proc/<pid>/cmdline shows it to the
whole host), every option the kernel has is there (fast_io_fail_tmo, which nvme-cli 2.3
lacks, among them), and no process is started (40 ms of an emulated CPU before nvme-cli
does anything). The kernel refuses a second controller for the same path (EALREADY), so
sysfs is read first; a key never reaches a log line or an error message.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flashmesh.dataplane import process
from flashmesh.dataplane.initiator import sysfs
from flashmesh.dataplane.initiator.sysfs import SYSFS, Controller
from flashmesh.dataplane.process import CommandError, Runner

log = logging.getLogger(__name__)

DEV = Path("/dev")
FABRICS = DEV / "nvme-fabrics"
# Writes a connect's option string to the fabrics device; the kernel's answer
# ("instance=N,cntlid=M"), or OSError with its errno.
Fabrics = Callable[[str], str]
TRANSPORTS = ("tcp", "rdma")
SEGMENT_NSID = 1
# Hints for the refusals seen in the lab, by the kernel's errno, so an error says what to
# check.
_HINTS = {
    errno.EIO: "refused: NQN not on that port, host not allowed, or a wrong key",
    errno.EKEYREJECTED: "the DH-HMAC-CHAP key is wrong",
    errno.ENOKEY: "the target wants a DH-HMAC-CHAP key",
    errno.EPERM: "the DH-HMAC-CHAP key is malformed",
    errno.ECONNREFUSED: "no nvmet port listens at that address",
    errno.ETIMEDOUT: "the address does not answer (network, or the node is down)",
    # Since Linux 6.5 the kernel refuses a host NQN it already knows with another host ID
    # ("found same hostnqn ... but different hostid" in its log).
    errno.EINVAL: (
        "the kernel knows this host NQN with another host ID: does another NVMe-oF tool on "
        "this node use /etc/nvme/hostnqn with a different /etc/nvme/hostid?"
    ),
}


class InitiatorError(RuntimeError):
    pass


@dataclass(frozen=True)
class ConnectOptions:
    """One path to one subsystem. Timeouts in seconds; None leaves the kernel's default
    (ctrl_loss_tmo 600, reconnect_delay 10, keep_alive_tmo 5, fast_io_fail_tmo off);
    -1 for ctrl_loss_tmo reconnects forever, for fast_io_fail_tmo turns it off."""

    transport: str
    traddr: str
    trsvcid: str
    nqn: str
    hostnqn: str
    hostid: str | None = None
    ctrl_loss_tmo: int | None = None
    reconnect_delay: int | None = None
    fast_io_fail_tmo: int | None = None
    keep_alive_tmo: int | None = None
    nr_io_queues: int | None = None  # None: the kernel's one per CPU
    # Kept out of repr, so a logged ConnectOptions shows no key.
    dhchap_secret: str | None = field(default=None, repr=False)
    dhchap_ctrl_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r} is not one of {', '.join(TRANSPORTS)}")
        if not self.trsvcid.isdigit():
            raise ValueError(f"trsvcid {self.trsvcid!r} is not a port number")
        for name in ("traddr", "nqn", "hostnqn"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")

    @property
    def where(self) -> str:
        return f"{self.nqn} at {self.transport} {self.traddr}:{self.trsvcid}"


def fabrics_options(opts: ConnectOptions) -> str:
    """The kernel's option string for this path (with the secrets in it: never log it)."""
    fields = (
        ("transport", opts.transport),
        ("traddr", opts.traddr),
        ("trsvcid", opts.trsvcid),
        ("nqn", opts.nqn),
        ("hostnqn", opts.hostnqn),
        ("hostid", opts.hostid),
        ("ctrl_loss_tmo", opts.ctrl_loss_tmo),
        ("reconnect_delay", opts.reconnect_delay),
        ("fast_io_fail_tmo", opts.fast_io_fail_tmo),
        ("keep_alive_tmo", opts.keep_alive_tmo),
        ("nr_io_queues", opts.nr_io_queues),
        ("dhchap_secret", opts.dhchap_secret),
        ("dhchap_ctrl_secret", opts.dhchap_ctrl_secret),
    )
    return ",".join(f"{key}={value}" for key, value in fields if value is not None)


def write_fabrics(options: str, device: Path = FABRICS) -> str:
    """Asks the kernel for a controller: one write of the option string, then its answer."""
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.write(fd, options.encode())
        return os.read(fd, 256).decode().strip()
    finally:
        os.close(fd)


def _matching(opts: ConnectOptions, root: Path) -> list[Controller]:
    """This path's controllers that are, or will again be, connected."""
    subsystem = sysfs.find_subsystem(opts.nqn, root)
    if subsystem is None:
        return []
    return [
        c
        for c in subsystem.controllers
        if c.active
        and c.reaches(opts.transport, opts.traddr, opts.trsvcid)
        and c.hostnqn in ("", opts.hostnqn)
    ]


def _hint(code: int | None) -> str:
    hint = _HINTS.get(code or 0)
    return f" ({hint})" if hint else ""


def _ensure_module(runner: Runner, transport: str, root: Path) -> None:
    # /dev/nvme-fabrics exists only once nvme-fabrics is loaded; without udev nothing
    # loads it on demand.
    if not (root / "module" / f"nvme_{transport}").exists():
        process.check(runner, ["modprobe", "-a", "nvme-fabrics", f"nvme-{transport}"])


def _set_fast_io_fail(controller: str, value: int, root: Path) -> None:
    path = sysfs.controller_attribute(controller, "fast_io_fail_tmo", root)
    wanted = "off" if value < 0 else str(value)
    try:
        if path.read_text().strip() != wanted:
            path.write_text(str(value))
    except OSError as exc:
        raise InitiatorError(f"cannot set {path} to {value}: {exc}") from exc


def connect(
    runner: Runner,
    opts: ConnectOptions,
    sysfs_root: Path = SYSFS,
    dev_root: Path = DEV,
    timeout: float = 60.0,
    poll: float = 0.2,
    fabrics: Fabrics = write_fabrics,
) -> str:
    """Connects this path unless a controller for it already exists (live, or reconnecting
    on its own), then waits for namespace 1's block device and returns its /dev path.
    Another path to the same subsystem returns the same device (native multipath)."""
    if not _matching(opts, sysfs_root):
        _ensure_module(runner, opts.transport, sysfs_root)
        try:
            log.info("connect %s: %s", opts.where, fabrics(fabrics_options(opts)))
        except OSError as exc:
            if exc.errno != errno.EALREADY:  # another caller raced us: not an error
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                raise InitiatorError(
                    f"nvme connect to {opts.where} failed: {why}{_hint(exc.errno)}"
                ) from None
    deadline = time.monotonic() + timeout
    while True:
        paths = _matching(opts, sysfs_root)
        device = sysfs.namespace_device(opts.nqn, SEGMENT_NSID, sysfs_root)
        if paths and device is not None and (dev_root / Path(device).name).exists():
            if opts.fast_io_fail_tmo is not None:
                for controller in paths:
                    _set_fast_io_fail(controller.name, opts.fast_io_fail_tmo, sysfs_root)
            return str(dev_root / Path(device).name)
        if time.monotonic() >= deadline:
            states = sysfs.path_states(opts.nqn, sysfs_root)
            seen = ", ".join(f"{t} {a}:{s} {st}" for t, a, s, st in states) or "no paths"
            raise InitiatorError(
                f"no block device for {opts.where} after {timeout:g} s ({seen}); check that "
                f"the target exports namespace {SEGMENT_NSID} to host {opts.hostnqn}"
            )
        time.sleep(poll)


def disconnect(runner: Runner, nqn: str, sysfs_root: Path = SYSFS) -> bool:
    """Disconnects every path to the subsystem; False when there was none. Remove any
    device-mapper table over its device first: an open head device outlives its paths."""
    subsystem = sysfs.find_subsystem(nqn, sysfs_root)
    if subsystem is None or not subsystem.controllers:
        return False
    try:
        process.check(runner, ["nvme", "disconnect", f"--nqn={nqn}"])
    except CommandError as exc:
        raise InitiatorError(f"nvme disconnect from {nqn} failed: {exc}") from None
    return True


def rescan(runner: Runner, nqn: str, sysfs_root: Path = SYSFS) -> list[str]:
    """Asks each live path to read its namespaces again, so a segment that grew on its
    storage node shows its new size (the kernel updates it a moment later, not at once);
    returns the controllers asked."""
    subsystem = sysfs.find_subsystem(nqn, sysfs_root)
    live = [c.name for c in (subsystem.controllers if subsystem else ()) if c.state == "live"]
    if not live:
        raise InitiatorError(f"no live path to {nqn} to rescan: connect it first")
    for controller in live:
        try:
            process.check(runner, ["nvme", "ns-rescan", f"/dev/{controller}"])
        except CommandError as exc:
            raise InitiatorError(f"rescan of {nqn} through {controller} failed: {exc}") from None
    return live
