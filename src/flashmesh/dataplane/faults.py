"""Crash points for the crash-safety tests.

With FLASHMESH_CRASH_AT=N in its environment, a process SIGKILLs itself just before its Nth
change to the node (an lvm2 change or an nvmet configfs action), where a power cut or an OOM
kill could stop it; with FLASHMESH_CRASH_AT=<word>, just before its first change whose
description starts with that word (such as `disconnect`). Unset, as it is outside those
tests, it does nothing.
"""

from __future__ import annotations

import logging
import os
import signal

ENV = "FLASHMESH_CRASH_AT"
FAIL_ENV = "FLASHMESH_FAIL_AT"
log = logging.getLogger(__name__)
_changes = 0


def before_change(what: str) -> None:
    global _changes
    crash_at = os.environ.get(ENV)
    if not crash_at:
        return
    _changes += 1
    if (crash_at.isdigit() and _changes >= int(crash_at)) or what.startswith(crash_at):
        log.warning("crash point: SIGKILL before change %d (%s)", _changes, what)
        os.kill(os.getpid(), signal.SIGKILL)


def failing(what: str) -> bool:
    """Whether this change is to fail (FLASHMESH_FAIL_AT names its first word)."""
    word = os.environ.get(FAIL_ENV)
    if word and what.startswith(word):
        log.warning("injected failure: %s", what)
        return True
    return False
