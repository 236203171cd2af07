"""What a test session needs to run a lab scenario again after a guest kernel panic."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest


def forget_failed_fixtures(item: pytest.Item, every_module_one: bool = False) -> list[str]:
    """Drops every fixture of `item` whose setup raised, so that running the item again
    sets each one up afresh. pytest keeps a fixture's error for the fixture's whole scope:
    without this, a module fixture that failed because a VM panicked under it fails the
    rerun, on the rebooted VM, with the same error. With every_module_one, module- and
    class-scoped fixtures that succeeded go too (torn down first): what they started in
    the VM (a node plugin) died with it, and the rerun and the module's later scenarios
    need it again. Session fixtures stay. Returns the names dropped."""
    dropped: list[str] = []
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return dropped
    # finish() reads only the request's node (the item's own request is gone by now).
    request = cast(Any, SimpleNamespace(node=item))
    for definitions in info.name2fixturedefs.values():
        for definition in definitions:
            cached = definition.cached_result
            scoped = every_module_one and definition.scope in ("module", "class")
            if cached is not None and (cached[2] is not None or scoped):
                definition.finish(request)  # (runs its finalizers and forgets the error)
                dropped.append(definition.argname)
    return dropped
