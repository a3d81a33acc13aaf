"""Slice choice for GetPreferredAllocation and validation for Allocate (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnpu.api import parse_slice_id
from vnpu.device_plugin.placement import AllocationError, preferred_allocation, validate_request


def ids(device: str, *indices: int) -> list[str]:
    return [f"{device}-s{i}" for i in indices]


FREE = ids("npu0", 0, 1, 2, 3, 4, 5) + ids("npu1", 2, 3, 4) + ids("npu2", 0, 1, 2, 3, 4, 5, 6, 7)


def test_best_fit_takes_the_tightest_device_that_holds_the_request():
    assert preferred_allocation(FREE, [], 3) == ids("npu1", 2, 3, 4)
    assert preferred_allocation(FREE, [], 4) == ids("npu0", 0, 1, 2, 3)
    assert preferred_allocation(FREE, [], 7) == ids("npu2", 0, 1, 2, 3, 4, 5, 6)


def test_the_annotated_device_wins_when_it_can_hold_the_request():
    assert preferred_allocation(FREE, [], 2, preferred_device="npu2") == ids("npu2", 0, 1)
    # npu1 has only 3 free: the annotation cannot be honoured, best fit decides.
    assert preferred_allocation(FREE, [], 4, preferred_device="npu1") == ids("npu0", 0, 1, 2, 3)


def test_must_include_pins_the_device():
    assert preferred_allocation(FREE, ["npu2-s5"], 3) == ["npu2-s5", "npu2-s0", "npu2-s1"]


def test_slices_the_ledger_holds_are_avoided_while_there_is_a_choice():
    assert preferred_allocation(FREE, [], 2, avoid={"npu1-s2"}) == ids("npu1", 3, 4)
    # npu1 no longer fits cleanly with two held slices: the next best device is used.
    assert preferred_allocation(FREE, [], 2, avoid={"npu1-s2", "npu1-s3"}) == ids("npu0", 0, 1)


def test_requests_no_device_can_hold_span_as_few_devices_as_possible():
    chosen = preferred_allocation(FREE, [], 10)
    assert len(chosen) == 10
    assert {parse_slice_id(s)[0] for s in chosen} == {"npu2", "npu0"}


def test_device_order_breaks_ties_and_slice_indices_sort_numerically():
    free = ids("b", 10, 2) + ids("a", 1, 0)
    assert preferred_allocation(free, [], 2, device_order={"b": 0, "a": 1}) == ["b-s2", "b-s10"]
    assert preferred_allocation(free, [], 2) == ["a-s0", "a-s1"]


@settings(max_examples=200, deadline=None)
@given(
    free=st.dictionaries(
        st.sampled_from(["npu0", "npu1", "npu2", "npu3"]), st.sets(st.integers(0, 15), min_size=1)
    ),
    size=st.integers(1, 20),
    data=st.data(),
)
def test_properties_of_any_preferred_allocation(free, size, data):
    available = [f"{d}-s{i}" for d, idx in free.items() for i in sorted(idx)]
    must = (
        data.draw(st.lists(st.sampled_from(available), max_size=min(2, size), unique=True))
        if available
        else []
    )
    chosen = preferred_allocation(available, must, size)
    assert set(must) <= set(chosen) <= set(available)
    assert len(chosen) == len(set(chosen)) == min(size, len(available))
    devices = {parse_slice_id(s)[0] for s in chosen}
    must_devices = {parse_slice_id(s)[0] for s in must}
    holds = [d for d, idx in free.items() if len(idx) >= size and must_devices <= {d}]
    if holds:
        assert len(devices) == 1 and devices <= set(holds)


DEVICE_OF = {sid: parse_slice_id(sid)[0] for sid in FREE}


def test_validate_groups_by_device():
    v = validate_request(ids("npu0", 0, 1), DEVICE_OF, {}, allow_spanning=False)
    assert v.by_device == {"npu0": ["npu0-s0", "npu0-s1"]} and v.slice_count == 2


@pytest.mark.parametrize(
    ("request_ids", "unhealthy", "message"),
    [
        ([], {}, "no device IDs"),
        (["npu0-s0", "npu0-s0"], {}, "repeats"),
        (["npu9-s0"], {}, "unknown device ID 'npu9-s0'"),
        (["npu0-s0", "npu1-s2"], {}, "span 2 physical devices"),
        (["npu0-s0"], {"npu0": "ECC storm"}, "npu0 is unhealthy: ECC storm"),
    ],
)
def test_validate_refuses_with_a_clear_message(request_ids, unhealthy, message):
    with pytest.raises(AllocationError, match=message):
        validate_request(request_ids, DEVICE_OF, unhealthy, allow_spanning=False)


def test_spanning_is_accepted_when_allowed():
    v = validate_request(["npu0-s0", "npu1-s2"], DEVICE_OF, {}, allow_spanning=True)
    assert v.devices == ["npu0", "npu1"]
