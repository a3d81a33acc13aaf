from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vnpu import api


@given(
    device=st.from_regex(r"[a-z0-9][a-z0-9-]{0,40}", fullmatch=True),
    index=st.integers(min_value=0, max_value=10**6),
)
def test_slice_id_round_trips(device: str, index: int) -> None:
    assert api.parse_slice_id(api.slice_id(device, index)) == (device, index)


def test_slice_id_length_is_bounded() -> None:
    with pytest.raises(ValueError, match="longer than 63"):
        api.slice_id("d" * 60, 1234)


@pytest.mark.parametrize("bad", ["npu0", "npu0-s", "npu0-sx", "-s1x"])
def test_parse_slice_id_rejects_foreign_ids(bad: str) -> None:
    with pytest.raises(ValueError, match="not a vnpu slice id"):
        api.parse_slice_id(bad)


@given(mib=st.integers(min_value=0, max_value=10**7), slice_mib=st.integers(min_value=1, max_value=65536))
def test_slices_cover_demand_tightly(mib: int, slice_mib: int) -> None:
    n = api.slices_for_mib(mib, slice_mib)
    assert n * slice_mib >= mib
    assert (n - 1) * slice_mib < mib or n == 0


def test_slices_for_mib_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        api.slices_for_mib(-1)
    with pytest.raises(ValueError):
        api.slices_for_mib(1, 0)
