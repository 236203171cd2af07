"""RDMA discovery with pyverbs: devices, ports, state, link layer, GIDs and the network
interface each port rides on. pyverbs is imported only here, and only when asked: a node
with no RDMA stack (or no pyverbs) simply has no RDMA devices and advertises TCP only.

`python -m flashmesh.dataplane.rdma` prints what it finds as JSON.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flashmesh.core import serde
from flashmesh.core.resources import RdmaDevice

log = logging.getLogger(__name__)

SYSFS = Path("/sys/class/infiniband")
PORT_STATES = {0: "NOP", 1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE", 5: "ACTIVE_DEFER"}
LINK_LAYERS = {0: "Unspecified", 1: "InfiniBand", 2: "Ethernet"}
ROCE_V2 = "RoCE v2"


@dataclass(frozen=True)
class Gid:
    index: int
    gid: str
    type: str  # "IB/RoCE v1" or "RoCE v2"
    netdev: str | None = None


@dataclass
class Port:
    device: str
    port: int
    state: str
    link_layer: str
    gids: list[Gid] = field(default_factory=list)

    def roce_v2_ipv4_gid(self) -> Gid | None:
        """The RoCEv2 GID of an IPv4 address (::ffff:a.b.c.d), what NVMe/RDMA over IPv4 uses."""
        for gid in self.gids:
            if gid.type == ROCE_V2 and _ipv4_of(gid.gid) is not None:
                return gid
        return None

    def summary(self) -> RdmaDevice:
        gid = self.roce_v2_ipv4_gid() or (self.gids[0] if self.gids else None)
        return RdmaDevice(
            name=self.device,
            port=self.port,
            state=self.state,
            link_layer=self.link_layer,
            netdev=gid.netdev if gid else None,
            gid=gid.gid if gid else None,
        )


def _ipv4_of(gid: str) -> str | None:
    with contextlib.suppress(ValueError):
        mapped = ipaddress.IPv6Address(gid).ipv4_mapped
        return str(mapped) if mapped else None
    return None


def discover() -> list[Port]:
    """Every port of every RDMA device; empty when the node has none."""
    try:
        import pyverbs.device as verbs
    except ImportError:
        return []
    ports: list[Port] = []
    try:
        devices = verbs.get_device_list()
    except Exception:  # no RDMA subsystem at all
        return []
    for dev in devices:
        name = dev.name.decode()
        with verbs.Context(name=name) as ctx:
            attrs = [ctx.query_port(n) for n in range(1, ctx.query_device().phys_port_cnt + 1)]
            table = _gid_table(ctx, name, sum(a.gid_tbl_len for a in attrs))
            for number, attr in enumerate(attrs, start=1):
                port = Port(
                    name,
                    number,
                    PORT_STATES.get(attr.state, str(attr.state)),
                    LINK_LAYERS.get(attr.link_layer, str(attr.link_layer)),
                )
                if table is not None:
                    port.gids = [gid for p, gid in table if p == number]
                else:
                    port.gids = _gids(ctx, name, number, attr.gid_tbl_len)
                ports.append(port)
    return ports


# ibv_gid_entry.gid_type, named as sysfs names them (gid_attrs/types).
GID_TYPES = {0: "IB/RoCE v1", 1: "IB/RoCE v1", 2: ROCE_V2}
# The kernel answers a GID table query in one attribute of at most 64 KiB (32 bytes a GID).
GID_TABLE_MAX = 2047


def _gid_table(ctx: object, device: str, length: int) -> list[tuple[int, Gid]] | None:
    """(port, GID) of every populated GID of the device, in one ioctl; None where the
    kernel or rdma-core cannot answer that way. Reading the table a GID at a time is 1024
    sysfs reads a port (soft-RoCE's table), half a second of an emulated CPU per pass."""
    try:
        entries = ctx.query_gid_table(min(length, GID_TABLE_MAX))  # type: ignore[attr-defined]
    except Exception as exc:  # an old kernel or rdma-core
        log.debug("%s: no GID table query (%s), reading GIDs one by one", device, exc)
        return None
    found = []
    for e in entries:
        netdev = None
        if e.ndev_ifindex:
            with contextlib.suppress(OSError):
                netdev = socket.if_indextoname(e.ndev_ifindex)
        kind = GID_TYPES.get(e.gid_type, "unknown")
        found.append((e.port_num, Gid(e.gid_index, e.gid_str(), kind, netdev)))
    return found


def _gids(ctx: object, device: str, port: int, table_length: int) -> list[Gid]:
    """The port's populated GIDs, one query each. The type and interface come from sysfs,
    which names them the same way on every rdma-core version."""
    found = []
    attrs = SYSFS / device / "ports" / str(port) / "gid_attrs"
    for index in range(table_length):
        try:
            gid = str(ctx.query_gid(port, index))  # type: ignore[attr-defined]
        except Exception:
            break
        if not gid.strip("0:"):
            continue  # an unpopulated entry (all zero)
        kind = _read(attrs / "types" / str(index)) or "unknown"
        found.append(Gid(index, gid, kind, _read(attrs / "ndevs" / str(index))))
    return found


def port_for_address(ports: list[Port], address: str) -> Port | None:
    """The active port whose RoCEv2 GID carries this IPv4 address (the node's fabric address)."""
    for port in ports:
        gid = port.roce_v2_ipv4_gid()
        if port.state == "ACTIVE" and gid is not None and _ipv4_of(gid.gid) == address:
            return port
    return None


def _read(path: Path) -> str | None:
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None


def main() -> int:
    ports = discover()
    json.dump(
        {
            "host": socket.gethostname(),
            "ports": [
                {**serde.to_dict(p.summary()), "gids": [serde.to_dict(g) for g in p.gids]}
                for p in ports
            ],
        },
        sys.stdout,
        indent=2,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
