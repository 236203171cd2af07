"""The lab's own network: a namespace with one or two bridges, and a tap per VM per bridge.

Addresses live only inside the namespace: bridge L is 10.77.L.254/24 and VM number i is
10.77.L.i. Nothing links the namespace to the machine's own network.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from pathlib import Path

SUBNET = "10.77"
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
PREFIX = "fmlab-"


def bridge_address(link: int) -> str:
    return f"{SUBNET}.{link}.254"


def vm_address(link: int, index: int) -> str:
    return f"{SUBNET}.{link}.{index}"


def tap_name(index: int, link: int) -> str:
    return f"fmtap{index}l{link}"  # at most 15 characters


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class LabNetwork:
    """A network namespace named after the process that made it, so a stale one (its
    owner gone) can be recognised and removed by the next run."""

    def __init__(self, links: int = 2, name: str | None = None) -> None:
        self.links = links
        self.name = name or f"{PREFIX}{os.getpid()}"
        self._host_ns: int | None = None

    def create(self) -> None:
        remove_stale()
        _ip("netns", "add", self.name)
        _ip("-n", self.name, "link", "set", "lo", "up")
        for link in range(self.links):
            _ip("-n", self.name, "link", "add", f"br{link}", "type", "bridge")
            _ip("-n", self.name, "addr", "add", f"{bridge_address(link)}/24", "dev", f"br{link}")
            _ip("-n", self.name, "link", "set", f"br{link}", "up")

    def add_tap(self, index: int, link: int) -> str:
        tap = tap_name(index, link)
        if _ip("-n", self.name, "link", "show", tap, check=False).returncode != 0:
            _ip("-n", self.name, "tuntap", "add", tap, "mode", "tap")
            _ip("-n", self.name, "link", "set", tap, "master", f"br{link}")
        _ip("-n", self.name, "link", "set", tap, "up")
        return tap

    def delete_tap(self, index: int, link: int) -> None:
        _ip("-n", self.name, "link", "delete", tap_name(index, link), check=False)

    def set_tap(self, index: int, link: int, up: bool) -> None:
        _ip("-n", self.name, "link", "set", tap_name(index, link), "up" if up else "down")

    def taps(self) -> list[str]:
        out = _ip("-n", self.name, "-o", "link", "show", "type", "tun", check=False).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()

    def enter(self) -> None:
        """Moves this thread (the test process's main thread) into the namespace; the
        processes it starts from now on live there too."""
        self._host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        _setns(NETNS_DIR / self.name)

    def leave(self) -> None:
        if self._host_ns is not None:
            _setns_fd(self._host_ns)
            os.close(self._host_ns)
            self._host_ns = None

    def destroy(self) -> None:
        self.leave()
        if self.exists():
            _ip("netns", "delete", self.name)


def remove_stale() -> None:
    """Deletes lab namespaces left by a run that was killed: their creating process is gone
    and no process (no VM) lives in them any more."""
    for path in NETNS_DIR.glob(f"{PREFIX}*"):
        pid = path.name.removeprefix(PREFIX).split("-")[0]
        owner_gone = pid.isdigit() and not Path(f"/proc/{pid}").exists()
        if owner_gone and not _ip("netns", "pids", path.name, check=False).stdout.strip():
            _ip("netns", "delete", path.name, check=False)


def _setns(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _setns_fd(fd)
    finally:
        os.close(fd)


def _setns_fd(fd: int) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def in_namespace(name: str) -> bool:
    """Whether this thread is in the named namespace."""
    with contextlib.suppress(OSError):
        return os.stat("/proc/thread-self/ns/net").st_ino == os.stat(NETNS_DIR / name).st_ino
    return False
