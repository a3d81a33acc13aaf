from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vnpu.inventory import HEALTHY, UNHEALTHY, DeviceInfo, NodeInventory

devices = st.builds(
    DeviceInfo,
    id=st.text(min_size=1, max_size=20),
    index=st.integers(0, 64),
    model=st.text(max_size=20),
    total_mib=st.integers(0, 1 << 20),
    slice_mib=st.integers(1, 1 << 16),
    slices=st.integers(0, 4096),
    health=st.sampled_from([HEALTHY, UNHEALTHY]),
    numa_node=st.none() | st.integers(0, 8),
    reason=st.text(max_size=30),
)


@given(st.lists(devices, max_size=8))
def test_inventory_json_round_trips(devs: list[DeviceInfo]) -> None:
    inv = NodeInventory(tuple(devs))
    assert NodeInventory.from_json(inv.to_json()) == inv


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("[]", "'devices' list"),
        ('{"devices": [{"id": "a"}]}', "device #0 is malformed"),
        (
            '{"devices": [{"id": "a", "index": "x", "total_mib": 1, "slice_mib": 1, "slices": 1}]}',
            "device #0",
        ),
    ],
)
def test_malformed_inventory_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NodeInventory.from_json(text)


@given(st.text(max_size=200))
def test_arbitrary_text_never_raises_anything_but_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        NodeInventory.from_json(text)
