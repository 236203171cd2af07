"""The storage agent (`flashmesh agent --node NAME`): one per storage node.

A level-triggered loop, safe to kill at any instant: each pass renews the node's Lease,
reads the node's drives, its StorageNode and pool, and every Volume and Snapshot, then
makes the node match — the pool's volume group and thin pool on the drives the pool
selects, one thin logical volume and one nvmet subsystem per local segment (a copy of its
source snapshot or volume when it has one), allowed to exactly the volume's hosts, and a
thin snapshot per local segment of each Snapshot — and reports: each segment's export in
its Volume's status and each snapshot segment in its Snapshot's status (server-side apply,
so agents on different nodes own their own entries), and the node's inventory, host NQN,
endpoints and heartbeat in its StorageNode. A Volume or Snapshot being deleted keeps this
agent's finalizer until its exports and logical volumes here are gone. A drive the pool
did not select is never touched.
"""

from flashmesh.dataplane.agent.loop import Agent, main
from flashmesh.dataplane.host_keys import HOST_NQN_ANNOTATION, KEY_LABEL

__all__ = ["HOST_NQN_ANNOTATION", "KEY_LABEL", "Agent", "main"]
