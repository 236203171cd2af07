from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashmesh.core.units import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("quantity", "size"),
    [("10Gi", 10 << 30), ("500M", 500 * 10**6), ("4096", 4096), ("1.5Ki", 1536), (7, 7),
     ("0.1", 1)],
)  # fmt: skip
def test_quantities_parse_to_bytes(quantity: str | int, size: int) -> None:
    assert parse_bytes(quantity) == size


@pytest.mark.parametrize("bad", ["", "ten", "10GB", "-1Gi", "1e3"])
def test_a_bad_quantity_names_the_fix(bad: str) -> None:
    with pytest.raises(ValueError, match="use a quantity such as 10Gi"):
        parse_bytes(bad)


@given(st.integers(min_value=0, max_value=2**62))
def test_formatting_round_trips(size: int) -> None:
    assert parse_bytes(format_bytes(size)) == size


def test_formatting_picks_the_largest_exact_unit() -> None:
    assert format_bytes(3 << 40) == "3Ti"
    assert format_bytes(1536 << 20) == "1536Mi"
    assert format_bytes(1000) == "1000"
