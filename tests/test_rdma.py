"""RDMA discovery's GID reading: the whole table in one query where the kernel has it, a GID
at a time (with sysfs for type and interface) where it has not."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from flashmesh.dataplane import rdma


@dataclass
class Entry:
    gid_index: int
    port_num: int
    gid_type: int
    ndev_ifindex: int
    text: str

    def gid_str(self) -> str:
        return self.text


V4 = "0000:0000:0000:0000:0000:ffff:0a4d:0001"
LINK = "fe80:0000:0000:0000:5054:00ff:fe77:0001"
ZERO = "0000:0000:0000:0000:0000:0000:0000:0000"


class TableContext:
    def __init__(self, entries: list[Entry]) -> None:
        self.entries = entries
        self.asked: list[int] = []

    def query_gid_table(self, max_entries: int) -> list[Entry]:
        self.asked.append(max_entries)
        return self.entries

    def query_gid(self, port: int, index: int) -> str:
        raise AssertionError("the table was answered: no GID is read one at a time")


def test_the_gid_table_is_read_in_one_query_with_types_and_interfaces() -> None:
    lo = socket.if_nameindex()[0]
    ctx = TableContext([Entry(0, 1, 2, lo[0], LINK), Entry(1, 1, 2, lo[0], V4),
                        Entry(0, 2, 0, 0, LINK)])  # fmt: skip
    table = rdma._gid_table(ctx, "rxe0", 1024 * 3)
    assert ctx.asked == [rdma.GID_TABLE_MAX]  # never more than one ioctl attribute holds
    assert table == [
        (1, rdma.Gid(0, LINK, rdma.ROCE_V2, lo[1])),
        (1, rdma.Gid(1, V4, rdma.ROCE_V2, lo[1])),
        (2, rdma.Gid(0, LINK, "IB/RoCE v1", None)),
    ]
    port = rdma.Port("rxe0", 1, "ACTIVE", "Ethernet", [g for p, g in table if p == 1])
    assert rdma.port_for_address([port], "10.77.0.1") is port


class OneByOneContext:
    """An rdma-core or kernel without the table query: GIDs one at a time."""

    def __init__(self, gids: list[str]) -> None:
        self.gids = gids

    def query_gid_table(self, max_entries: int) -> list[Entry]:
        raise OSError(95, "Operation not supported")

    def query_gid(self, port: int, index: int) -> str:
        if index >= len(self.gids):
            raise OSError(22, "Invalid argument")
        return self.gids[index]


def test_without_the_table_query_gids_are_read_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attrs = tmp_path / "rxe0" / "ports" / "1" / "gid_attrs"
    for kind in ("types", "ndevs"):
        (attrs / kind).mkdir(parents=True)
    (attrs / "types" / "2").write_text("RoCE v2\n")
    (attrs / "ndevs" / "2").write_text("eth0\n")
    monkeypatch.setattr(rdma, "SYSFS", tmp_path)
    ctx = OneByOneContext([ZERO, ZERO, V4])
    assert rdma._gid_table(ctx, "rxe0", 3) is None
    assert rdma._gids(ctx, "rxe0", 1, 3) == [rdma.Gid(2, V4, rdma.ROCE_V2, "eth0")]
