"""Per-volume locks: a second call is ABORTED; background work never fails a call."""

from __future__ import annotations

import threading

import grpc
import pytest

from flashmesh.csi_driver.errors import CsiError
from flashmesh.csi_driver.locks import VolumeLocks


def test_a_second_call_on_a_busy_volume_is_aborted() -> None:
    locks = VolumeLocks()
    with locks.hold("fm-1"):
        with pytest.raises(CsiError) as caught, locks.hold("fm-1"):
            pass
        assert caught.value.code == grpc.StatusCode.ABORTED
        with locks.hold("fm-2"):  # another volume is free
            pass
        with pytest.raises(CsiError), locks.hold("fm-1", background=True):
            pass  # background work skips a volume a call holds


def test_a_call_waits_for_background_work_to_end() -> None:
    locks = VolumeLocks()
    inside, release, done = threading.Event(), threading.Event(), threading.Event()

    def background() -> None:
        with locks.hold("fm-1", background=True):
            inside.set()
            release.wait(30)

    worker = threading.Thread(target=background)
    worker.start()
    assert inside.wait(30)

    def call() -> None:
        with locks.hold("fm-1"):
            done.set()

    caller = threading.Thread(target=call)
    caller.start()
    assert not done.wait(0.3)  # still waiting: the background pass holds the volume
    release.set()
    caller.join(30)
    worker.join(30)
    assert done.is_set()


def test_a_background_pass_that_never_ends_still_gets_the_call_an_answer() -> None:
    locks = VolumeLocks(background_wait=0.05)
    with locks.hold("fm-1", background=True), pytest.raises(CsiError) as caught, locks.hold("fm-1"):
        pass
    assert caught.value.code == grpc.StatusCode.ABORTED
