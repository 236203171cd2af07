"""The control plane is the real one, built from Go modules and stamped with its version."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest

from flashmesh.lab.binaries import versions
from flashmesh.lab.cluster import LocalCluster

pytestmark = pytest.mark.cluster


def test_server_and_kubectl_report_the_pinned_kubernetes_version(cluster: LocalCluster) -> None:
    pinned = versions()["KUBERNETES_VERSION"]
    reported = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert reported["clientVersion"]["gitVersion"] == pinned
    assert reported["serverVersion"]["gitVersion"] == pinned


def test_every_server_listens_on_loopback_only(cluster: LocalCluster) -> None:
    """Loopback only; in the lab's own namespace the apiserver also serves the VMs."""
    listening = _listening_sockets()
    for name, pid in cluster.state.pids.items():
        mine = {listening[inode] for inode in _socket_inodes(pid) if inode in listening}
        assert mine, f"{name} listens nowhere"
        addresses = {address for address, _ in mine}
        if cluster.state.bind_all and name == "kube-apiserver":
            assert addresses <= {"0.0.0.0", "::"}, f"{name}: {mine}"
        else:
            assert addresses == {"127.0.0.1"}, f"{name}: {mine}"
    every_port = {port for inode, (_, port) in listening.items()}
    assert set(cluster.state.ports.values()) <= every_port


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _listening_sockets() -> dict[int, tuple[str, int]]:
    """Listening TCP sockets from /proc/net/tcp{,6}: inode -> (address, port)."""
    out: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            out[int(fields[9])] = (_address(hex_addr), int(hex_port, 16))
    return out


def _address(hex_addr: str) -> str:
    # The kernel prints each 32-bit word of the address in host (little-endian) order.
    raw = b"".join(bytes.fromhex(hex_addr[i : i + 8])[::-1] for i in range(0, len(hex_addr), 8))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw)
