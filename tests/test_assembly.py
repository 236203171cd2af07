"""Device-mapper stripes: the table maths (what dm-stripe accepts), and ensure / remove over
a runner that records argv and answers dmsetup as the lab's kernel did."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashmesh.dataplane import assembly
from flashmesh.dataplane.assembly import AssemblyError, StripedTable
from flashmesh.dataplane.process import Result

NAME = "flashmesh-fm-0123456789ab"
DEVICES = ["/dev/nvme1n1", "/dev/nvme2n1"]
NUMBERS = {"/dev/nvme1n1": "259:1", "/dev/nvme2n1": "259:4", "/dev/nvme3n1": "259:6"}
ABSENT = Result(
    ("dmsetup",), 1, "", "device-mapper: table ioctl on x  failed: No such device or address\n"
)


class Dmsetup:
    """Answers `dmsetup table` with the live table (None: no device) and `dmsetup info`
    with its suspended state; records every command."""

    def __init__(self, table: str | None = None, suspended: bool = False) -> None:
        self.table = table
        self.suspended = suspended
        self.argv: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> Result:
        self.argv.append(tuple(argv))
        if argv[1] == "table":
            if self.table is None:
                return ABSENT
            return Result(tuple(argv), 0, self.table + "\n", "")
        if argv[1] == "info":
            return Result(tuple(argv), 0, "Suspended\n" if self.suspended else "Active\n", "")
        return Result(tuple(argv), 0, "", "")

    def changes(self) -> list[str]:
        return [" ".join(a) for a in self.argv if a[1] not in ("table", "info")]


def ensure(dm: Dmsetup, devices: list[str], segment: int, chunk: int = 128) -> str:
    return assembly.ensure_striped(dm, NAME, devices, segment, chunk, number_of=NUMBERS.__getitem__)


# --- the table ---------------------------------------------------------------------------


def test_two_64_mib_segments_in_64_kib_chunks() -> None:
    assert assembly.striped_table(DEVICES, 131072, 128) == (
        "0 262144 striped 2 128 /dev/nvme1n1 0 /dev/nvme2n1 0"
    )


@pytest.mark.parametrize("stripes", range(1, 17))
@pytest.mark.parametrize(
    ("segment", "chunk"), [(131072, 128), (196609, 128), (1000, 8), (2047, 1024)]
)
def test_every_stripe_count_gives_a_length_dm_accepts(
    stripes: int, segment: int, chunk: int
) -> None:
    devices = [f"/dev/nvme{i}n1" for i in range(stripes)]
    words = assembly.striped_table(devices, segment, chunk).split()
    length = int(words[1])
    # dm-stripe: the length divides by the stripe count, and each share by the chunk.
    assert length % stripes == 0 and (length // stripes) % chunk == 0
    assert segment * stripes - chunk * stripes < length <= segment * stripes
    assert words[2:5] == ["striped", str(stripes), str(chunk)]
    assert words[5:] == [w for d in devices for w in (d, "0")]


@given(
    stripes=st.integers(1, 16),
    segment=st.integers(8, 1 << 40),
    chunk_pages=st.integers(1, 512),
)
def test_the_length_is_the_largest_whole_chunk_stripe(
    stripes: int, segment: int, chunk_pages: int
) -> None:
    chunk = chunk_pages * 8
    if segment < chunk:
        with pytest.raises(ValueError, match="hold no"):
            assembly.stripe_length(stripes, segment, chunk)
        return
    length = assembly.stripe_length(stripes, segment, chunk)
    assert length % (chunk * stripes) == 0
    assert length <= segment * stripes < length + chunk * stripes


@pytest.mark.parametrize(
    ("devices", "segment", "chunk", "message"),
    [
        ([], 1024, 128, "at least one device"),
        (DEVICES, 1024, 100, "not a multiple of 8"),
        (DEVICES, 1024, 0, "not a multiple of 8"),
        (DEVICES, 100, 128, "hold no 128-chunk"),
        (["/dev/nvme1n1", "/dev/nvme1n1"], 1024, 128, "appears twice"),
    ],
)
def test_tables_dm_would_refuse_are_refused_here(
    devices: list[str], segment: int, chunk: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        assembly.striped_table(devices, segment, chunk)


def test_the_kernels_table_parses_back() -> None:
    parsed = assembly.parse_table("0 262144 striped 2 128 259:1 0 259:4 0\n")
    assert parsed == StripedTable(262144, 128, ("259:1", "259:4"))
    assert parsed.text() == "0 262144 striped 2 128 259:1 0 259:4 0"
    assert assembly.parse_table("0 262144 linear 259:1 0") is None
    assert assembly.parse_table("0 2048 striped 2 128 259:1 0 259:4 8") is None
    assert assembly.parse_table("0 8 striped 1 8 259:1 0\n8 8 striped 1 8 259:4 0") is None


def test_dm_names() -> None:
    assert assembly.dm_name("fm-0123456789ab") == NAME
    for bad in ("", "a/b", "a b", "x" * 118):
        with pytest.raises(ValueError, match="cannot name"):
            assembly.dm_name(bad)
    assert len(assembly.dm_name("x" * 117)) == 127


# --- ensure / remove ---------------------------------------------------------------------


def test_a_missing_stripe_is_created() -> None:
    dm = Dmsetup()
    assert ensure(dm, DEVICES, 131072) == f"/dev/mapper/{NAME}"
    assert dm.changes() == [
        f"dmsetup create {NAME} --table 0 262144 striped 2 128 /dev/nvme1n1 0 /dev/nvme2n1 0"
    ]
    assert dm.argv[-1][-2:] == ("--table", "0 262144 striped 2 128 /dev/nvme1n1 0 /dev/nvme2n1 0")


def test_a_matching_stripe_is_left_alone() -> None:
    dm = Dmsetup("0 262144 striped 2 128 259:1 0 259:4 0")
    ensure(dm, DEVICES, 131072)
    assert dm.changes() == []


def test_a_stripe_left_suspended_is_resumed() -> None:
    dm = Dmsetup("0 262144 striped 2 128 259:1 0 259:4 0", suspended=True)
    ensure(dm, DEVICES, 131072)
    assert dm.changes() == [f"dmsetup resume {NAME}"]


def test_grown_segments_reload_a_longer_table() -> None:
    dm = Dmsetup("0 262144 striped 2 128 259:1 0 259:4 0")
    ensure(dm, DEVICES, 196608)
    assert dm.changes() == [
        f"dmsetup reload {NAME} --table 0 393216 striped 2 128 /dev/nvme1n1 0 /dev/nvme2n1 0",
        f"dmsetup resume {NAME}",
    ]


def test_a_segment_device_renamed_after_a_reconnect_is_reloaded() -> None:
    dm = Dmsetup("0 262144 striped 2 128 259:1 0 259:4 0")
    ensure(dm, ["/dev/nvme1n1", "/dev/nvme3n1"], 131072)
    assert dm.changes()[0].endswith("/dev/nvme1n1 0 /dev/nvme3n1 0")


@pytest.mark.parametrize(
    ("devices", "segment", "chunk", "message"),
    [
        (DEVICES, 65536, 128, "would shrink from 262144 to 131072 sectors"),
        (DEVICES, 131072, 256, "stripes 2 x 128 sectors, the volume 2 x 256"),
        (["/dev/nvme1n1", "/dev/nvme2n1", "/dev/nvme3n1"], 131072, 128, "scramble"),
    ],
)
def test_changes_that_would_move_data_are_refused(
    devices: list[str], segment: int, chunk: int, message: str
) -> None:
    dm = Dmsetup("0 262144 striped 2 128 259:1 0 259:4 0")
    with pytest.raises(AssemblyError, match=message):
        ensure(dm, devices, segment, chunk)
    assert dm.changes() == []


def test_a_foreign_device_with_the_name_is_not_touched() -> None:
    dm = Dmsetup("0 2048 linear 259:1 0")
    with pytest.raises(AssemblyError, match="exists but is not a FlashMesh stripe"):
        ensure(dm, DEVICES, 131072)


def test_a_failed_create_says_what_the_devices_need() -> None:
    def refusing(argv: Sequence[str]) -> Result:
        if argv[1] == "table":
            return ABSENT
        return Result(
            tuple(argv), 1, "", "device-mapper: reload ioctl on x failed: Invalid argument"
        )

    with pytest.raises(AssemblyError, match="every device must hold at least 131072 sectors"):
        assembly.ensure_striped(refusing, NAME, DEVICES, 131072, 128, number_of=NUMBERS.__getitem__)


def test_remove_is_idempotent() -> None:
    dm = Dmsetup()
    assert assembly.remove(dm, NAME) is False
    assert assembly.current_table(dm, NAME) is None
    dm.table = "0 262144 striped 2 128 259:1 0 259:4 0"
    assert assembly.remove(dm, NAME) is True
    assert dm.changes() == [f"dmsetup remove {NAME}"]


def test_a_busy_device_says_to_unmount_first() -> None:
    def busy(argv: Sequence[str]) -> Result:
        if argv[1] == "table":
            return Result(tuple(argv), 0, "0 8 striped 1 8 259:1 0\n", "")
        return Result(
            tuple(argv), 1, "", "device-mapper: remove ioctl on x failed: Device or resource busy"
        )

    with pytest.raises(AssemblyError, match="Device or resource busy; unmount it"):
        assembly.remove(busy, NAME)


def test_a_dmsetup_failure_other_than_absence_is_an_error() -> None:
    def broken(argv: Sequence[str]) -> Result:
        return Result(tuple(argv), 1, "", "/dev/mapper/control: open failed: No such device")

    with pytest.raises(AssemblyError, match="dmsetup table x failed: /dev/mapper/control"):
        assembly.current_table(broken, "x")
