"""Informers: a watched, locally cached view of one kind, as Kubernetes controllers keep.

An informer lists its objects once (in pages), then watches from the list's
resourceVersion: every change updates the cache and is handed to the informer's
listeners, which enqueue work; readers read the cache and never ask the API server. A
watch the server ends is resumed from the last resourceVersion seen (bookmarks keep it
fresh); one whose version expired (410 Gone) lists again, and an API server that restarts
or a network that drops is retried with a growing pause, resuming where it left off. The
kubernetes client lists and watches; the cache, the resume and the listeners are this
module's own, and so is the record of the versions each key was seen at, with which a
writer waits until the cache shows its own write (`wait_seen`), or puts that write in
itself when the watch is late (`assume`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from flashmesh.kube import Kube, KubeError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = str  # "name" or "namespace/name"
Listener = Callable[[str, Obj | None, Obj | None], None]  # (key, old, new)

EVENTS = Counter(
    "flashmesh_watch_events_total", "Watch events received, by kind and type", ["kind", "type"]
)
LISTS = Counter(
    "flashmesh_watch_lists_total",
    "Full lists an informer made: the first one, after an expired resource version, "
    "or when no version was left to resume from",
    ["kind", "reason"],
)
RESTARTS = Counter(
    "flashmesh_watch_restarts_total",
    "Watches that ended in an error and were resumed, by kind and cause",
    ["kind", "cause"],
)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0
# resourceVersions remembered per key (what `seen` answers from), and how many deleted
# keys keep theirs: enough for a writer to find its own write among the changes after it.
HISTORY_PER_KEY = 8
HISTORY_GONE_KEYS = 1024


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    return f"{namespace}/{meta['name']}" if namespace else str(meta["name"])


@dataclass
class Informer:
    """One kind, optionally narrowed to a namespace and a label selector."""

    kube: Kube
    api_version: str
    kind: str
    namespace: str | None = None
    label_selector: str | None = None
    _items: dict[Key, Obj] = field(default_factory=dict)
    _listeners: list[Listener] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _synced: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    # Bumped on every change, so a waiter can tell a change since it last looked.
    generation: int = 0
    # The resourceVersions the list and the watch showed for each key (deleted keys for a
    # while too): a writer waits until the cache has seen its write (`wait_seen`).
    _history: dict[Key, deque[str]] = field(default_factory=dict)
    _gone: OrderedDict[Key, deque[str]] = field(default_factory=OrderedDict)

    # --- use ----------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Called (on the informer's thread) for every object that changed; keep it short:
        enqueue a key, set an event."""
        self._listeners.append(listener)

    def start(self, resume_from: str = "") -> Informer:
        """Lists, then watches, on a thread of its own. `resume_from`, a resourceVersion
        seen before, skips the first list when the server still holds that version."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, args=(resume_from,), name=f"watch-{self.kind}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def fill(self) -> None:
        """One list into the cache, with no watch after it (a single pass's reads)."""
        self._relist("initial")

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once the first list is in the cache."""
        return self._synced.wait(timeout)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def get(self, name: str, namespace: str | None = None) -> Obj | None:
        with self._changed:
            return self._items.get(f"{namespace}/{name}" if namespace else name)

    def items(self) -> list[Obj]:
        """Every cached object (shared: do not change them)."""
        with self._changed:
            return list(self._items.values())

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Waits, without asking the API server, until predicate() holds; it is evaluated
        now and after each change the watch brings."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def seen(self, key: Key, version: str) -> bool:
        """Whether the list or the watch has shown this key at this resourceVersion
        (answered for a while after the key is deleted, too)."""
        with self._changed:
            return self._seen(key, version)

    def wait_seen(self, key: Key, version: str, timeout: float) -> bool:
        """Waits, without asking the API server, until the cache has seen a write that
        returned this resourceVersion: the cache then holds it or something newer."""
        return self.wait_for(lambda: self._seen(key, version), timeout)

    def assume(self, obj: Obj) -> bool:
        """Puts an object a write returned into the cache ahead of its watch event, when
        the watch is late: only if the key is absent, or cached at an older version
        (compared as numbers, as kube-scheduler's assume cache does), and never once the
        watch has shown that version (it may have been deleted since). The watch's own
        events replace it as they come. True when it was put."""
        key, version = key_of(obj), _version(obj)
        with self._changed:
            if not version or self._seen(key, version):
                return False
            old = self._items.get(key)
            if old is not None and not _older(old, obj):
                return False
            self._items[key] = obj
            self.generation += 1
            self._changed.notify_all()
        self._tell(key, old, obj)
        return True

    def _seen(self, key: Key, version: str) -> bool:
        versions = self._history.get(key) or self._gone.get(key) or ()
        return version in versions

    def _remember(self, key: Key, obj: Obj, deleted: bool = False) -> None:
        """Records a version shown for key (the caller holds the lock)."""
        versions = self._history.get(key) or self._gone.pop(key, None)
        if versions is None:
            versions = deque(maxlen=HISTORY_PER_KEY)
        versions.append(_version(obj))
        if deleted:
            self._history.pop(key, None)
            self._gone[key] = versions
            while len(self._gone) > HISTORY_GONE_KEYS:
                self._gone.popitem(last=False)
        else:
            self._history[key] = versions

    # --- the watch loop -----------------------------------------------------------------

    def _run(self, version: str = "") -> None:
        pause = BACKOFF_FIRST
        reason = "initial"
        while not self._stop.is_set():
            try:
                if not version:
                    version = self._relist(reason)
                for kind, obj in self.kube.watch(
                    self.api_version, self.kind, version, self.namespace, self.label_selector
                ):
                    EVENTS.labels(self.kind, kind).inc()
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if kind != "BOOKMARK":
                        self._apply(kind, obj)
                    pause = BACKOFF_FIRST
                    if self._stop.is_set():
                        return
            except KubeError as exc:
                if exc.status == 410:
                    log.info(
                        "%s watch: resource version %s expired; listing again", self.kind, version
                    )
                    version, reason = "", "expired"
                    RESTARTS.labels(self.kind, "expired").inc()
                    continue
                RESTARTS.labels(self.kind, f"http-{exc.status}").inc()
                log.warning("%s watch failed (%s); resuming in %.1f s", self.kind, exc, pause)
                if not version:
                    reason = "error"
                self._stop.wait(pause)
                pause = min(pause * 2, BACKOFF_MAX)
            except Exception:  # a bug or an unexpected answer must not end the cache
                RESTARTS.labels(self.kind, "error").inc()
                log.exception("%s watch failed; listing again in %.1f s", self.kind, pause)
                version, reason = "", "error"
                self._stop.wait(pause)
                pause = min(pause * 2, BACKOFF_MAX)

    def _relist(self, reason: str) -> str:
        items, version = self.kube.list_with_version(
            self.api_version, self.kind, self.namespace, self.label_selector
        )
        LISTS.labels(self.kind, reason).inc()
        fresh = {key_of(o): o for o in items}
        with self._changed:
            old = self._items
            self._items = fresh
            for key, obj in fresh.items():
                self._remember(key, obj)
            for key in old.keys() - fresh.keys():
                self._remember(key, old[key], deleted=True)
            self.generation += 1
            self._changed.notify_all()
        for key in old.keys() - fresh.keys():
            self._tell(key, old[key], None)
        for key, obj in fresh.items():
            before = old.get(key)
            if before is None or _version(before) != _version(obj):
                self._tell(key, before, obj)
        self._synced.set()
        return version

    def _apply(self, kind: str, obj: Obj) -> None:
        key = key_of(obj)
        with self._changed:
            old = self._items.get(key)
            if kind == "DELETED":
                self._items.pop(key, None)
            else:
                self._items[key] = obj
            self._remember(key, obj, deleted=kind == "DELETED")
            self.generation += 1
            self._changed.notify_all()
        self._tell(key, old, None if kind == "DELETED" else obj)

    def _tell(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        for listener in self._listeners:
            try:
                listener(key, old, new)
            except Exception:
                log.exception("%s listener failed on %s", self.kind, key)


def _version(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _older(cached: Obj, written: Obj) -> bool:
    """Whether the cached object predates the written one; False when either version is
    not a number (they are etcd revisions on every API server of today)."""
    a, b = _version(cached), _version(written)
    return a.isdigit() and b.isdigit() and int(a) < int(b)


def start_all(informers: Iterable[Informer], timeout: float = 60.0) -> None:
    """Starts informers and waits for each one's first list; a cache that cannot fill in
    time is an error (the caller retries or fails its start-up)."""
    started = [i.start() for i in informers]
    deadline = time.monotonic() + timeout
    for informer in started:
        if not informer.wait_synced(max(deadline - time.monotonic(), 0)):
            raise KubeError(
                503,
                "ServiceUnavailable",
                f"the {informer.kind} cache did not fill in {timeout:.0f} s",
            )
