"""Host identity decisions: a host NQN claimed by two nodes is refused everywhere, because
two hosts sharing one NQN would share one controller's view of a volume and corrupt it."""

from __future__ import annotations

from collections.abc import Iterable


def shared_host_nqns(claims: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """From (node, host NQN) claims, the host NQNs claimed by more than one node, each with
    the sorted names of the nodes that claim it."""
    nodes_of: dict[str, set[str]] = {}
    for node, nqn in claims:
        if nqn:
            nodes_of.setdefault(nqn, set()).add(node)
    return {nqn: sorted(nodes) for nqn, nodes in nodes_of.items() if len(nodes) > 1}


def duplicate_message(nqn: str, node: str, nodes: list[str]) -> str:
    """What a person reads on a node whose host NQN another node also claims."""
    others = ", ".join(n for n in nodes if n != node)
    return (
        f"host NQN {nqn} is also claimed by {others}: give each node its own "
        "/etc/nvme/hostnqn and hostid (a cloned image carries them; `nvme gen-hostnqn`) and "
        "a distinct SMBIOS UUID (/sys/class/dmi/id/product_uuid); this host NQN may connect "
        "to no volume until only one node claims it (connections it has are kept)"
    )


def refusal_message(nqn: str, nodes: list[str]) -> str:
    """Why a volume's export leaves out a host NQN that several nodes claim."""
    return (
        f"host {nqn} may not connect: nodes {', '.join(nodes)} all claim it, and two hosts "
        "with one NQN would corrupt the volume (a connection it already has is kept)"
    )
