"""A CSI capacity range made into a volume size, as the CSI spec prescribes: an absent range
or zeros mean the pool's default; a limit below the requirement, or a size no pool could
ever hold, is out of range."""

from __future__ import annotations

from flashmesh.core.units import format_bytes

EXTENT = 4 << 20  # LVM's extent: every segment is a whole number of them


class CapacityError(ValueError):
    """kind: "invalid" (a negative number) or "out_of_range"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def alignment(stripe_width: int) -> int:
    """A volume's size is a whole number of extents on each of its stripes."""
    return EXTENT * stripe_width


def volume_size(required: int, limit: int, default: int, stripe_width: int) -> int:
    if required < 0 or limit < 0:
        raise CapacityError(
            "invalid", "capacity_range: required_bytes and limit_bytes must not be negative"
        )
    if limit and required > limit:
        raise CapacityError(
            "out_of_range",
            f"capacity_range: limit_bytes {limit} is below required_bytes {required}",
        )
    step = alignment(stripe_width)
    wanted = required or (min(default, limit) if limit else default)
    size = -(-wanted // step) * step
    if limit and size > limit:
        size = limit // step * step
    if size < max(required, 1):
        raise CapacityError(
            "out_of_range",
            f"capacity_range: no size between {required} and {limit} bytes is a whole number "
            f"of {format_bytes(step)} ({stripe_width} stripe(s) of {format_bytes(EXTENT)})",
        )
    return size
