"""Starting and ending the lab's own processes, by PID, with their logs kept."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# The kernel sends SIGTERM to a process whose parent dies, so an interrupted test run
# leaves no orphaned servers behind. setpriv asks for it just before it executes the
# server: a preexec_fn would make Python fork() instead of vfork(), and a fork runs the
# atfork handlers of gRPC's core in the child, which (with the fds closed under it) can
# kill the child before it ever executes (seen as a csi-attacher that never started).
_SETPRIV = "/usr/bin/setpriv"
_DIE_WITH_PARENT = [_SETPRIV, "--pdeathsig", "TERM", "--"]


def spawn(
    argv: list[str], log: Path, die_with_parent: bool, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Starts a server in its own session, stdout and stderr to its log file, with env
    added to this process's environment. Without $KUBECONFIG: client-go prefers it to
    --kubeconfig, and a lab process must talk to the cluster it is given, not to whichever
    the caller's environment names."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if k != "KUBECONFIG"}, **(env or {})}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*_DIE_WITH_PARENT, *argv] if die_with_parent else argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if die_with_parent:
        # Returns once setpriv has executed the server, so the PID names the server's
        # executable (what is_ours checks) from the start, and so do the args callers
        # read back to stop or start it again.
        wait_until(lambda: proc.poll() is not None or _exe(proc.pid) != _SETPRIV, 10, 0.005)
        proc.args = argv
    return proc


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def is_ours(pid: int, executable: str) -> bool:
    """True while pid is alive and still runs the executable we started (not a reused PID)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return exe.removesuffix(" (deleted)") == executable and state != "Z"


def end(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Ends a process this one started: SIGTERM, then SIGKILL after the timeout."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop(pid: int, executable: str, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after the timeout; only if pid still runs our executable."""

    def gone() -> bool:
        # Reap it if it is our child, so it does not linger as a zombie.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return not is_ours(pid, executable)

    if gone():
        return
    os.kill(pid, signal.SIGTERM)
    if not wait_until(gone, timeout):
        os.kill(pid, signal.SIGKILL)
        wait_until(gone, 10.0)


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Polls condition until it holds or the timeout passes; returns whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
