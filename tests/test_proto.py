"""The committed CSI stubs are exactly what `make proto` generates from the vendored
csi.proto, so nobody edits them by hand and the generator stays reproducible."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "src/flashmesh/csi_driver/_proto"
GENERATED = ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")


def test_the_committed_stubs_match_the_generator(tmp_path: Path) -> None:
    work = tmp_path / "src/flashmesh/csi_driver/_proto"
    work.mkdir(parents=True)
    shutil.copy(PROTO_DIR / "csi.proto", work / "csi.proto")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Isrc", "--python_out=src",
         "--pyi_out=src", "--grpc_python_out=src", "src/flashmesh/csi_driver/_proto/csi.proto"],
        cwd=tmp_path, check=True,
    )  # fmt: skip
    for name in GENERATED:
        assert (work / name).read_text() == (PROTO_DIR / name).read_text(), (
            f"{name} differs from the generator's output: run `make proto` and commit"
        )


def test_the_vendored_proto_is_csi_v1_12() -> None:
    text = (PROTO_DIR / "csi.proto").read_text()
    assert "package csi.v1;" in text
    from flashmesh.csi_driver._proto import csi_pb2

    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    assert {"Identity", "Controller", "Node"} <= set(csi_pb2.DESCRIPTOR.services_by_name)
