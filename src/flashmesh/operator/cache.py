"""What the operator knows of the cluster between watch events: its kopf indexes, read as
plain copies, and the objects it wrote itself that its watches have not brought back yet.

A reconcile decides from these and never reads the API. A watch event follows each write
by a moment; a reconcile in that moment would otherwise see the object as it was before
and do the write (and its Event) again."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping
from typing import Any

Key = tuple[str, str]  # (kind, name)


def plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a kopf body: kept in an index, it must not change under a reader."""
    return copy.deepcopy(dict(body))


def version(obj: Mapping[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion")


def one(index: Mapping[Any, Any], key: Any) -> Any:
    """The value an index keeps under key (one object per key here), or None."""
    store = index.get(key)
    return next(iter(store), None) if store else None


def every(index: Mapping[Any, Any]) -> Iterator[Any]:
    for store in index.values():
        yield from store


class Recent:
    """The answers of this operator's own writes, each kept while the index still shows
    the version the write was made over (or no object, for a create). Once the index has
    moved on (to this write, or to a later one by anyone), the index is the latest again.

    So a reconcile compares with what is on the server: the index can only be behind our
    own last write, and then that write's answer is newer. Thread-safe: written from the
    reconcile threads, read on kopf's event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wrote: dict[Key, tuple[str | None, dict[str, Any] | None]] = {}

    def wrote(self, key: Key, before: str | None, after: dict[str, Any] | None) -> None:
        """after is the server's answer to the write (None: the object was deleted). A
        write over our own earlier one, which the index has not shown yet either, is kept
        against the version the index still shows."""
        with self._lock:
            earlier = self._wrote.get(key)
            if earlier is not None and version(earlier[1]) == before:
                before = earlier[0]
            self._wrote[key] = (before, after)

    def latest(self, key: Key, indexed: dict[str, Any] | None) -> dict[str, Any] | None:
        with self._lock:
            entry = self._wrote.get(key)
            if entry is None:
                return indexed
            before, after = entry
            if version(indexed) == before:
                return after
            del self._wrote[key]
            return indexed

    def forget(self, key: Key) -> None:
        with self._lock:
            self._wrote.pop(key, None)
