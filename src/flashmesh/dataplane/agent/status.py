"""Comparing a status the agent would write with the one the API server holds, so that an
unchanged status is never written again."""

from __future__ import annotations

from typing import Any


def own_entries(obj: dict[str, Any] | None, node: str) -> list[dict[str, Any]]:
    """The status.segments entries of this node in an object, in (index, replica) order:
    the entries the agent owns through server-side apply."""
    segments = ((obj or {}).get("status") or {}).get("segments") or []
    mine = [s for s in segments if s.get("node") == node]
    return sorted(mine, key=lambda s: (s.get("index", 0), s.get("replica", 0)))
