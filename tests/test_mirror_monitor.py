"""The node plugin's monitor: a volume whose pass could not finish (its record not written,
the API server away) is looked at again soon, not after the long interval; a stripe whose
segment the kernel gave up on is connected again and its table reloaded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from flashmesh.core import naming
from flashmesh.csi_driver.errors import CsiError
from flashmesh.csi_driver.mirror_monitor import MirrorMonitor
from flashmesh.csi_driver.node import Node, Staged
from flashmesh.dataplane import assembly
from flashmesh.dataplane.initiator import sysfs
from flashmesh.dataplane.process import Result

HOST = "nqn.2014-08.org.nvmexpress:uuid:0b4a0000-0000-4000-8000-000000000001"


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


def test_a_stripe_whose_segment_controller_was_given_up_is_reconnected_and_reloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-way stripe on /dev/nvme0n1 (259:0) and /dev/nvme1n1 (259:1); the kernel gave the
    second segment's controller up (ctrlLossTmo ran out): no namespace device, the table
    still names 259:1. While the storage node is away the monitor only tries to connect;
    once it answers, the segment comes back as /dev/nvme2n1 (259:4) and the table is
    reloaded over it, with no NodeStage. Mirrors were all the monitor looked at before."""
    vid = "fm-000000000002"
    first, second = naming.subsystem_nqn(vid, 0, 0), naming.subsystem_nqn(vid, 1, 0)
    devices = {first: "/dev/nvme0n1", second: None}
    numbers = {"/dev/nvme0n1": "259:0", "/dev/nvme1n1": "259:1", "/dev/nvme2n1": "259:4"}
    monkeypatch.setattr(sysfs, "namespace_device", lambda nqn, *a: devices[nqn])
    monkeypatch.setattr(sysfs, "block_sectors", lambda name, *a: 2048)
    monkeypatch.setattr(sysfs, "block_name", lambda path: path.rsplit("/", 1)[-1])
    dm = assembly.dm_name(vid)
    ran: list[list[str]] = []

    def runner(argv: Sequence[str], *, secrets: Sequence[str] = ()) -> Result:
        ran.append(list(argv))
        if argv[:2] == ["dmsetup", "table"]:
            return Result(list(argv), 0, "0 4096 striped 2 256 259:0 0 259:1 0\n", "")
        return Result(list(argv), 0, "", "")

    node = Node(HOST, "0b4a", "default", tmp_path / "state", runner=runner)
    node.device_number = numbers.__getitem__
    connects: list[str] = []
    back = False

    def connect(vid_: str, nqn: str, endpoints: list[str], *rest: Any) -> str:
        connects.append(nqn)
        if not back:
            raise CsiError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        devices[nqn] = "/dev/nvme2n1"
        return "/dev/nvme2n1"

    node.connect = connect  # type: ignore[method-assign]
    segments = [{"nqn": n, "endpoints": ["tcp:10.77.0.1:4420"]} for n in (first, second)]
    staged = Staged([first, second], f"/dev/mapper/{dm}", dm, True, None,
                    segments=segments, context={"pool": "p", "stripeWidth": "2"})  # fmt: skip
    node._save(vid, staged)
    monitor = MirrorMonitor(node, reconnect_every=0.0)
    monitor.pass_once()
    assert connects == [second] and not [a for a in ran if a[:2] == ["dmsetup", "reload"]]
    back = True
    monitor.pass_once()
    assert connects == [second, second]
    table = "0 4096 striped 2 256 259:0 0 259:4 0"
    assert ["dmsetup", "reload", dm, "--table", table.replace("259:0", "/dev/nvme0n1")
            .replace("259:4", "/dev/nvme2n1")] in ran, ran  # fmt: skip
    assert ["dmsetup", "resume", dm] in ran
    ran.clear()
    monitor.pass_once()  # whole again: nothing connected, nothing reloaded
    assert connects == [second, second] and ran == []


def test_a_stripe_reload_is_forced_even_where_the_device_number_came_back_the_same() -> None:
    ran: list[list[str]] = []

    def runner(argv: Sequence[str], *, secrets: Sequence[str] = ()) -> Result:
        ran.append(list(argv))
        out = "0 4096 striped 2 256 259:0 0 259:1 0\n" if argv[1] == "table" else ""
        return Result(list(argv), 0, out, "")

    numbers = {"/dev/a": "259:0", "/dev/b": "259:1"}.__getitem__
    assembly.ensure_striped(runner, "s", ["/dev/a", "/dev/b"], 2048, 256, numbers)
    assert [a[1] for a in ran] == ["table", "info"]  # unchanged: kept
    ran.clear()
    assembly.ensure_striped(runner, "s", ["/dev/a", "/dev/b"], 2048, 256, numbers, reload=True)
    assert [a[1] for a in ran] == ["table", "reload", "resume"]
