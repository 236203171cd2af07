"""One operation per volume at a time: a concurrent call on the same volume gets ABORTED,
as the CSI spec asks, instead of racing the first.

The node plugin's own background work (the mirror monitor) takes a volume's lock too, as
background: it never waits (a busy volume is looked at in its next pass), and a CSI call
that finds it there waits for the pass to end instead of failing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from flashmesh.csi_driver.errors import CsiError

BACKGROUND_WAIT = 120.0  # seconds a CSI call waits for a background pass on its volume


class VolumeLocks:
    def __init__(self, background_wait: float = BACKGROUND_WAIT) -> None:
        self._changed = threading.Condition()
        self._busy: dict[str, bool] = {}  # key -> held by background work
        self._background_wait = background_wait

    @contextmanager
    def hold(self, key: str, background: bool = False) -> Iterator[None]:
        with self._changed:
            if not background:
                self._changed.wait_for(
                    lambda: self._busy.get(key) is not True, self._background_wait
                )
            if key in self._busy:
                raise CsiError(
                    grpc.StatusCode.ABORTED,
                    f"an operation on {key} is already in progress; retry when it ends",
                )
            self._busy[key] = background
        try:
            yield
        finally:
            with self._changed:
                del self._busy[key]
                self._changed.notify_all()
