"""One operation per volume at a time: a concurrent call on the same volume gets ABORTED,
as the CSI spec asks, instead of racing the first."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from flashmesh.csi_driver.errors import CsiError


class VolumeLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._busy: set[str] = set()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            if key in self._busy:
                raise CsiError(
                    grpc.StatusCode.ABORTED,
                    f"an operation on {key} is already in progress; retry when it ends",
                )
            self._busy.add(key)
        try:
            yield
        finally:
            with self._guard:
                self._busy.discard(key)
