"""Which paths a GPU node connects a segment over. A segment advertises one endpoint per
transport and address; the node takes RDMA only where one of its ACTIVE RDMA ports is the
interface its kernel routes the storage address through (an InfiniBand port that serves
only NCCL, or a RoCE NIC on another subnet, would fail the connect or, worse, carry it
over a link it was never meant for), and TCP otherwise. When the class leaves the
transport open, TCP is also the fallback for an RDMA connect that fails.

The route is read from /proc/net/route (the main IPv4 table, longest prefix first): no
process to fork on a node where each one costs. Policy routing is not followed."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from flashmesh.dataplane import rdma

ROUTES = Path("/proc/net/route")
SYSFS_RDMA = Path("/sys/class/infiniband")


@dataclass(frozen=True)
class FabricPath:
    transport: str
    address: str
    port: str


def parse_endpoints(endpoints: list[str]) -> list[FabricPath]:
    """`transport:address:port` as segments advertise them (checked by parse_segments)."""
    found = []
    for endpoint in endpoints:
        transport, rest = endpoint.split(":", 1)
        address, port = rest.rsplit(":", 1)
        found.append(FabricPath(transport, address, port))
    return found


def plan(
    endpoints: list[str], requested: str | None, rdma_interfaces: set[str],
    route: Callable[[str], str | None],
) -> tuple[list[FabricPath], list[FabricPath]]:  # fmt: skip
    """The paths to connect first, and the TCP paths to fall back to if every one of those
    fails (empty where the class chose a transport: its choice is kept)."""
    paths = parse_endpoints(endpoints)
    tcp = [p for p in paths if p.transport == "tcp"]
    if requested is not None:
        return [p for p in paths if p.transport == requested], []
    reachable = [p for p in paths if p.transport == "rdma" and route(p.address) in rdma_interfaces]
    return (reachable, tcp) if reachable else (tcp, [])


def rdma_interfaces(ports: Iterable[rdma.Port], sysfs: Path = SYSFS_RDMA) -> set[str]:
    """The network interfaces the node's ACTIVE RDMA ports ride on: a RoCE port's GID
    interfaces, an InfiniBand port's IPoIB interfaces (in its PCI device's net folder,
    which also holds the device's other ports' interfaces)."""
    found: set[str] = set()
    for port in ports:
        if port.state != "ACTIVE":
            continue
        found |= {g.netdev for g in port.gids if g.netdev}
        net = sysfs / port.device / "device" / "net"
        if port.link_layer == "InfiniBand" and net.is_dir():
            found |= {n.name for n in net.iterdir() if _ipoib_of(n, port.port)}
    return found


ARPHRD_INFINIBAND = "32"


def _ipoib_of(netdev: Path, port: int) -> bool:
    """Whether an interface of an HCA is IPoIB over this port (dev_port counts the ports
    from 0); one whose sysfs says neither is taken, as the device's own."""
    try:
        kind, dev_port = ((netdev / f).read_text().strip() for f in ("type", "dev_port"))
    except OSError:
        return True
    return kind == ARPHRD_INFINIBAND and dev_port == str(port - 1)


def route_interface(address: str, table: str) -> str | None:
    """The interface /proc/net/route's table sends an IPv4 address out of: the longest
    matching prefix, the lowest metric among equals; None for no route or not IPv4."""
    try:
        # The table's hex fields are the kernel's words in host byte order.
        wanted = struct.unpack("=I", socket.inet_aton(address))[0]
    except OSError:
        return None
    best: tuple[int, int, str] | None = None  # (prefix length, -metric, interface)
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, destination, flags, metric, mask = (
            fields[0], int(fields[1], 16), int(fields[3], 16), int(fields[6]), int(fields[7], 16)
        )  # fmt: skip
        if not flags & 0x1 or wanted & mask != destination:  # RTF_UP
            continue
        rank = (bin(mask).count("1"), -metric, iface)
        if best is None or rank[:2] > best[:2]:
            best = rank
    return best[2] if best else None


def kernel_route(address: str, routes: Path = ROUTES) -> str | None:
    try:
        return route_interface(address, routes.read_text())
    except OSError:
        return None
