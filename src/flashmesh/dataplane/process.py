"""The one place that runs commands on a node. Everything else gets a Runner, so tests can
record the argv they would run.

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


def run(argv: Sequence[str], timeout: float = 120, *, secrets: Sequence[str] = ()) -> Result:
    """Runs a command; its exit code and output (a non-zero exit is not an exception).
    Secrets reach the process only, never the log or the Result."""
    log.debug("run: %s", " ".join(redact_text(arg, secrets) for arg in argv))
    try:
        # No stdin: a tool that asks (lvm2's "wipe it?") gets no answer and refuses.
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        if not any(secrets):
            raise
        # Its message quotes the command line: raise it again without the secrets.
        shown = [redact_text(arg, secrets) for arg in argv]
        raise subprocess.TimeoutExpired(shown, exc.timeout) from None
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
