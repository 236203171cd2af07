"""The one place that runs commands on a node. Everything else gets a Runner, so tests can
record the argv they would run.

Each command gets the time its kind needs: commands that write a filesystem's or an array's
metadata (mkfs, resize, fsck, mdadm) are never killed, since one killed half-way leaves a
partial superblock for the retry to meet; every other command gets DEFAULT_TIMEOUT, and one
that runs out is a failed command (exit TIMED_OUT) like any other, its caller's error, which
the CSI services answer with UNAVAILABLE (the CO retries).

A command that must carry a secret (a DH-HMAC-CHAP key for `nvme connect`) names it in
`secrets`: the real argv goes to the process, but the logged line, the Result's argv and
output, and so any CommandError message, show `<redacted>` in its place.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

log = logging.getLogger(__name__)

REDACTED = "<redacted>"


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str


class CommandError(RuntimeError):
    def __init__(self, result: Result) -> None:
        detail = result.stderr.strip() or result.stdout.strip()
        super().__init__(f"{' '.join(result.argv)} failed ({result.rc}): {detail}")
        self.result = result

    @property
    def timed_out(self) -> bool:
        return self.result.rc == TIMED_OUT


DEFAULT_TIMEOUT = 120.0
TIMED_OUT = 124  # the exit code timeout(1) gives a command it killed
# Programs never killed on a timer (see above); matched by name, or by prefix for mkfs.*.
UNBOUNDED = ("mkfs", "mke2fs", "resize2fs", "xfs_growfs", "e2fsck", "fsck", "xfs_repair",
             "mdadm")  # fmt: skip


def timeout_for(argv: Sequence[str]) -> float | None:
    """The time a command may take: None (no limit) for the programs in UNBOUNDED."""
    program = argv[0].rsplit("/", 1)[-1] if argv else ""
    if program in UNBOUNDED or program.startswith(("mkfs.", "fsck.")):
        return None
    return DEFAULT_TIMEOUT


Runner = Callable[[Sequence[str]], Result]


class SecretRunner(Protocol):
    """A Runner that also takes the secrets to keep out of what it logs and returns; `run`
    is one, and any SecretRunner can be passed where a Runner is asked for."""

    def __call__(self, argv: Sequence[str], *, secrets: Sequence[str] = ()) -> Result: ...


def redact_text(text: str, secrets: Sequence[str]) -> str:
    # Longest first, so a secret that contains another is hidden whole.
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact(result: Result, secrets: Sequence[str]) -> Result:
    """The result with every secret replaced by <redacted> in its argv and output."""
    if not any(secrets):
        return result
    return replace(
        result,
        argv=tuple(redact_text(arg, secrets) for arg in result.argv),
        stdout=redact_text(result.stdout, secrets),
        stderr=redact_text(result.stderr, secrets),
    )


def run(
    argv: Sequence[str], timeout: float | None = -1.0, *, secrets: Sequence[str] = ()
) -> Result:
    """Runs a command; its exit code and output (a non-zero exit is not an exception, nor is
    running out of time: exit TIMED_OUT). The timeout is the command's own (timeout_for)
    unless given; None is no limit. Secrets reach the process only, never the log or the
    Result."""
    log.debug("run: %s", " ".join(redact_text(arg, secrets) for arg in argv))
    limit = timeout_for(argv) if timeout is not None and timeout < 0 else timeout
    try:
        # No stdin: a tool that asks (lvm2's "wipe it?") gets no answer and refuses.
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=limit, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        result = Result(tuple(argv), TIMED_OUT, out, f"timed out after {limit:g} s (killed)")
        return redact(result, secrets)
    return redact(Result(tuple(argv), done.returncode, done.stdout, done.stderr), secrets)


def check(runner: Runner, argv: Sequence[str]) -> Result:
    """Runs a command and raises CommandError when it fails."""
    result = runner(argv)
    if result.rc != 0:
        raise CommandError(result)
    return result


def check_secret(runner: SecretRunner, argv: Sequence[str], secrets: Sequence[str]) -> Result:
    """check() for a command carrying secrets. The result is redacted here as well, so a
    runner that forgot to cannot leak a secret into a CommandError."""
    result = redact(runner(argv, secrets=secrets), secrets)
    if result.rc != 0:
        raise CommandError(result)
    return result
