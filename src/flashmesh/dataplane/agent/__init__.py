"""The storage agent (`flashmesh agent --node NAME`): one per storage node.

A level-triggered loop, safe to kill at any instant. It watches what concerns its node
(its StorageNode and pool, the Volumes and Snapshots labelled with its node, other nodes'
host NQNs) and runs a pass when one of them changes, soon again when a pass left work
undone, and every few minutes otherwise (a heartbeat thread renews the node's Lease). A
pass reads the caches and the node's drives, then makes the node match — the pool's volume
group and thin pool on the drives the pool selects, one thin logical volume and one nvmet
subsystem per local segment (a copy of its source snapshot or volume when it has one),
allowed to exactly the volume's hosts, and a thin snapshot per local segment of each
Snapshot — and reports: each segment's export in its Volume's status and each snapshot
segment in its Snapshot's status (server-side apply, so agents on different nodes own
their own entries), and the node's inventory, host NQN and endpoints in its StorageNode,
each written only when it differs. A Volume or Snapshot being deleted keeps this agent's
finalizer until its exports and logical volumes here are gone. A drive the pool did not
select is never touched.
"""

from flashmesh.dataplane.agent.loop import Agent, main
from flashmesh.dataplane.host_keys import HOST_NQN_ANNOTATION, KEY_LABEL

__all__ = ["HOST_NQN_ANNOTATION", "KEY_LABEL", "Agent", "main"]
