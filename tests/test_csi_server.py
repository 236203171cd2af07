"""The CSI server under a burst: calls that wait never starve Probe (the liveness probe)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc

from flashmesh.csi_driver._proto import csi_pb2, csi_pb2_grpc
from flashmesh.csi_driver.identity import Identity
from flashmesh.csi_driver.server import BUSY_CALLS, serve
from flashmesh.lab import processes


class SlowController(csi_pb2_grpc.ControllerServicer):
    """A FAKE controller whose CreateVolume waits until released: it stands in for calls
    waiting on agents (the real ones wait up to minutes)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def CreateVolume(self, request: Any, context: Any) -> csi_pb2.CreateVolumeResponse:
        with self._lock:
            self.entered += 1
        self.release.wait(120)
        return csi_pb2.CreateVolumeResponse(volume=csi_pb2.Volume(volume_id=request.name))


def test_64_slow_calls_never_keep_probe_from_answering(tmp_path: Path) -> None:
    slow = SlowController()
    server = serve(
        f"unix://{tmp_path}/csi.sock",
        [lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(Identity(), s),
         lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(slow, s)],
    )  # fmt: skip
    channel = grpc.insecure_channel(f"unix://{tmp_path}/csi.sock")
    try:
        controller = csi_pb2_grpc.ControllerStub(channel)
        identity = csi_pb2_grpc.IdentityStub(channel)
        calls = [
            controller.CreateVolume.future(csi_pb2.CreateVolumeRequest(name=f"v{i}"), timeout=120)
            for i in range(64)
        ]
        # Workers are all taken by waiting calls (16 filled the server this replaces).
        assert processes.wait_until(lambda: slow.entered >= 16, 60), slow.entered
        longest = 0.0
        for _ in range(20):  # the liveness probe's calls, while every busy worker waits
            begin = time.monotonic()
            answer = identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
            longest = max(longest, time.monotonic() - begin)
            assert answer.ready.value
        assert processes.wait_until(lambda: slow.entered >= BUSY_CALLS, 60), slow.entered
        assert processes.wait_until(lambda: sum(c.done() for c in calls) == 64 - BUSY_CALLS, 60)
        turned_away = [c for c in calls if c.done()]
        assert {c.code() for c in turned_away} == {grpc.StatusCode.UNAVAILABLE}
        assert "busy" in (turned_away[0].details() or "")
        slow.release.set()
        done = [c.result(timeout=60) for c in calls if c not in turned_away]
        assert len(done) == BUSY_CALLS and slow.entered == BUSY_CALLS
        print(f"64 slow calls: {BUSY_CALLS} ran, {len(turned_away)} told UNAVAILABLE at once; "
              f"20 Probes all answered, the longest in {longest * 1000:.1f} ms")  # fmt: skip
    finally:
        slow.release.set()
        channel.close()
        server.stop(0).wait()
