"""The node plugin's mirror monitor: a volume whose pass could not finish (its record not
written, the API server away) is looked at again soon, not after the long interval."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flashmesh.csi_driver.mirror_monitor import MirrorMonitor


class FakeNode:
    """A FAKE node plugin with one mirrored volume staged; its status cannot be written."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        (state_dir / "fm-000000000001.json").write_text("{}")
        self.locks = self

    @contextlib.contextmanager
    def hold(self, vid: str, background: bool = False) -> Iterator[None]:
        yield

    def load(self, vid: str) -> Any:
        return SimpleNamespace(md=["fm-000000000001-s0"])


def test_a_volume_whose_record_could_not_be_written_is_retried_soon(tmp_path: Path) -> None:
    monitor = MirrorMonitor(FakeNode(tmp_path), interval=10.0)  # type: ignore[arg-type]
    calls: list[str] = []

    def unwritable(vid: str, staged: Any) -> None:
        calls.append(vid)
        raise ConnectionRefusedError("the API server is unreachable")

    monitor.check = unwritable  # type: ignore[method-assign]
    assert monitor.pass_once() == ["fm-000000000001-s0"]
    assert calls == ["fm-000000000001"] and monitor._unfinished
    assert monitor.retry_after == 2.0 < monitor.interval
    monitor.check = lambda vid, staged: None  # type: ignore[method-assign]
    monitor.pass_once()
    assert not monitor._unfinished  # written: back to waiting for md or the interval
