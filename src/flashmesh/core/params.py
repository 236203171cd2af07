"""StorageClass parameters of a FlashMesh volume, checked and given their defaults.

Every parameter is named in the error that refuses it, with the fix. Parameters that the
external-provisioner adds (prefixed csi.storage.k8s.io/) are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from flashmesh.core.resources import Layout

PROVISIONER_PREFIX = "csi.storage.k8s.io/"
TRANSPORTS = ("rdma", "tcp")


class ParameterError(ValueError):
    """A parameter a person must fix; the message names it."""


@dataclass(frozen=True)
class Timeouts:
    """NVMe/TCP and NVMe/RDMA connection timeouts (seconds) that NodeStage passes to
    `nvme connect`; -1 means retry forever (ctrl_loss_tmo) or off (fast_io_fail_tmo).

    The defaults ride out a storage node's reboot: I/O to it is queued, not failed
    (fast_io_fail_tmo off), while the kernel reconnects every 2 s for 30 minutes; the pod
    sees a stall. Past that, I/O fails. A class that would rather fail fast sets
    fastIoFailTmo (and a shorter ctrlLossTmo)."""

    ctrl_loss_tmo: int = 1800
    reconnect_delay: int = 2
    fast_io_fail_tmo: int = -1
    keep_alive_tmo: int = 5


@dataclass(frozen=True)
class VolumeParams:
    pool: str
    layout: Layout
    transport: str | None  # preferred; None: rdma where the node reaches it, else tcp
    timeouts: Timeouts
    # I/O queues per connection. The kernel's default is one per CPU: on a GPU node with
    # 128 CPUs that is 128 sockets or QPs per segment, hundreds of thousands on a storage
    # node serving a cluster. A few queues carry a segment's bandwidth.
    nr_io_queues: int = 4

    def context(self) -> dict[str, str]:
        """The volume_context NodeStage receives (no secrets: it is stored in the PV)."""
        out = {
            "pool": self.pool,
            "stripeWidth": str(self.layout.stripe_width),
            "replicas": str(self.layout.replicas),
            "ctrlLossTmo": str(self.timeouts.ctrl_loss_tmo),
            "reconnectDelay": str(self.timeouts.reconnect_delay),
            "fastIoFailTmo": str(self.timeouts.fast_io_fail_tmo),
            "keepAliveTmo": str(self.timeouts.keep_alive_tmo),
            "nrIoQueues": str(self.nr_io_queues),
        }
        if self.transport:
            out["transport"] = self.transport
        return out


_TIMEOUTS = {
    "ctrlLossTmo": ("ctrl_loss_tmo", -1),
    "reconnectDelay": ("reconnect_delay", 1),
    "fastIoFailTmo": ("fast_io_fail_tmo", -1),
    "keepAliveTmo": ("keep_alive_tmo", 1),
}
KNOWN = ("pool", "stripeWidth", "replicas", "transport", "nrIoQueues", *_TIMEOUTS)
MAX_IO_QUEUES = 128  # nvmet's attr_qid_max default: more are never granted
MAX_REPLICAS = 2  # md RAID1 over two storage nodes
MIRRORED_TIMEOUTS = {"ctrl_loss_tmo": -1, "fast_io_fail_tmo": 5}


def _integer(name: str, value: str, minimum: int, maximum: int = 3600) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ParameterError(
            f"parameter {name}={value!r} is not a whole number: use {minimum}..{maximum}"
        ) from None
    if not minimum <= number <= maximum:
        raise ParameterError(f"parameter {name}={number} is out of range: use {minimum}..{maximum}")
    return number


def parse(parameters: dict[str, str], default_layout: Layout | None = None) -> VolumeParams:
    """Checked parameters; the pool's default layout fills what the class leaves out."""
    unknown = sorted(
        k for k in parameters if k not in KNOWN and not k.startswith(PROVISIONER_PREFIX)
    )
    if unknown:
        raise ParameterError(f"unknown parameter {unknown[0]}: FlashMesh takes {', '.join(KNOWN)}")
    pool = parameters.get("pool", "")
    if not pool:
        raise ParameterError("parameter pool is missing: name the StoragePool to provision from")
    layout = default_layout or Layout()
    stripes = layout.stripe_width
    if "stripeWidth" in parameters:
        stripes = _integer("stripeWidth", parameters["stripeWidth"], 1, 16)
    replicas = layout.replicas
    if "replicas" in parameters:
        replicas = _integer("replicas", parameters["replicas"], 1, MAX_REPLICAS)
    transport = parameters.get("transport") or None
    if transport is not None and transport not in TRANSPORTS:
        raise ParameterError(f"parameter transport={transport!r} is unknown: use rdma or tcp")
    # A mirror's member must fail fast (md then carries on with the others) and keep
    # reconnecting (so it comes back when its node does): unless the class says otherwise.
    values = dict(MIRRORED_TIMEOUTS) if replicas > 1 else {}
    for key, (field, minimum) in _TIMEOUTS.items():
        if key in parameters:
            values[field] = _integer(key, parameters[key], minimum)
    queues = VolumeParams.nr_io_queues
    if "nrIoQueues" in parameters:
        queues = _integer("nrIoQueues", parameters["nrIoQueues"], 1, MAX_IO_QUEUES)
    return VolumeParams(pool, Layout(stripes, replicas), transport, Timeouts(**values), queues)


def from_context(context: dict[str, str]) -> VolumeParams:
    """The parameters back from a volume_context that CreateVolume wrote."""
    return parse(
        {k: v for k, v in context.items() if k in KNOWN},
        None,
    )
