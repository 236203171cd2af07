"""Which address a storage node serves NVMe-oF on: its StorageNode's spec.fabricAddress, else
the agent's --address (the chart's status.hostIP). A change of address moves every nvmet
port, and hosts connect to the address their volume was published with: so it waits until
none of the node's volumes is published, and the condition FabricAddress says why."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable

from flashmesh.core.resources import Condition

TYPE = "FabricAddress"


def is_local(address: str) -> bool:
    """Whether an interface of this node carries the address (a socket can bind it)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((address, 0))
        return True
    return False


def choose(
    wanted: str | None,
    flag: str,
    serving: str | None,
    published: int,
    local: Callable[[str], bool] = is_local,
) -> tuple[str, Condition]:
    """The address to serve on, and the condition saying so.

    wanted: spec.fabricAddress; flag: the agent's --address; serving: the address of the
    endpoints last reported (None before the first); published: the node's volumes with a
    host; local: whether an address is on an interface of this node."""
    target = wanted or flag
    source = "spec.fabricAddress" if wanted else "the agent's --address"
    if serving and serving != target and published:
        return serving, Condition(
            TYPE,
            "False",
            "ChangeWaits",
            f"serving on {serving} until no volume of this node is published ({published} "
            f"are): hosts connect to the address they were given; {target} ({source}) then",
        )
    if not local(target):
        return target, Condition(
            TYPE,
            "False",
            "NotLocal",
            f"{target} ({source}) is on no interface of this node: nvmet cannot listen on "
            "it; set spec.fabricAddress to one of the node's addresses",
        )
    return target, Condition(TYPE, "True", "Serving", f"serving on {target} ({source})")
