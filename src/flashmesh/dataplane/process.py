"""The one place that runs commands on a node. Everything else gets a Runner, so tests can
record the argv they would run."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


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


def run(argv: Sequence[str], timeout: float = 120) -> Result:
    """Runs a command; its exit code and output (a non-zero exit is not an exception)."""
    log.debug("run: %s", " ".join(argv))
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    return Result(tuple(argv), done.returncode, done.stdout, done.stderr)


def check(runner: Runner, argv: Sequence[str]) -> Result:
    """Runs a command and raises CommandError when it fails."""
    result = runner(argv)
    if result.rc != 0:
        raise CommandError(result)
    return result
