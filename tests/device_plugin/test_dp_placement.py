"""Slice choice within one device (GetPreferredAllocation), request validation for one device's
endpoint (Allocate) and the container edits for a device: all pure."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnpu.api import parse_slice_id
from vnpu.device_plugin import contract
from vnpu.device_plugin.allocation import AllocationError, Mount, container_edits
from vnpu.device_plugin.backends.base import PhysicalDevice
from vnpu.device_plugin.backends.simulated import SimulatedBackend
from vnpu.device_plugin.devices import DeviceEntry
from vnpu.device_plugin.placement import preferred_allocation, validate_request


def ids(device: str, *indices: int) -> list[str]:
    return [f"{device}-s{i}" for i in indices]


NPU2 = ids("npu2", 7, 0, 3, 1, 10, 2)


def test_free_slices_in_index_order():
    assert preferred_allocation(NPU2, [], 3) == ids("npu2", 0, 1, 2)
    assert preferred_allocation(ids("b", 10, 2, 1), [], 2) == ["b-s1", "b-s2"]  # numerically, not as text


def test_must_include_comes_first():
    assert preferred_allocation(NPU2, ["npu2-s10"], 3) == ["npu2-s10", "npu2-s0", "npu2-s1"]
    assert preferred_allocation(NPU2, ["npu2-s10", "npu2-s7"], 1) == ["npu2-s10", "npu2-s7"]


def test_slices_the_ledger_holds_are_avoided_while_there_is_a_choice():
    assert preferred_allocation(NPU2, [], 2, avoid={"npu2-s0"}) == ids("npu2", 1, 2)
    everything = set(NPU2)
    assert preferred_allocation(NPU2, [], 2, avoid=everything) == ids("npu2", 0, 1)  # kubelet's view wins


@settings(max_examples=200, deadline=None)
@given(
    free=st.sets(st.integers(0, 63), min_size=1),
    held=st.sets(st.integers(0, 63)),
    size=st.integers(1, 70),
    data=st.data(),
)
def test_properties_of_any_preferred_allocation(free, held, size, data):
    available = [f"npu0-s{i}" for i in sorted(free)]
    must = data.draw(st.lists(st.sampled_from(available), max_size=min(2, size), unique=True))
    avoid = {f"npu0-s{i}" for i in held}
    chosen = preferred_allocation(available, must, size, avoid=avoid)
    assert set(must) <= set(chosen) <= set(available)
    assert len(chosen) == len(set(chosen)) == max(len(must), min(size, len(available)))
    clean = [s for s in available if s not in avoid and s not in must]
    # A held slice is only taken when every free one already is.
    if any(s in avoid and s not in must for s in chosen):
        assert set(clean) <= set(chosen)


DEVICE_OF = {sid: parse_slice_id(sid)[0] for sid in NPU2 + ids("npu1", 0, 1)}


def test_validate_accepts_slices_of_its_own_device():
    validate_request(ids("npu2", 0, 1), DEVICE_OF, "npu2")


@pytest.mark.parametrize(
    ("request_ids", "message"),
    [
        ([], "no device IDs"),
        (["npu2-s0", "npu2-s0"], "repeats"),
        (["npu9-s0"], "unknown device ID 'npu9-s0'"),
        (["npu2-s0", "npu1-s1"], "'npu1-s1' is a slice of npu1, not of npu2"),
    ],
)
def test_validate_refuses_with_a_clear_message(request_ids, message):
    with pytest.raises(AllocationError, match=message):
        validate_request(request_ids, DEVICE_OF, "npu2")


def entry(index: int = 3, healthy: bool = True, reason: str = "") -> DeviceEntry:
    device = PhysicalDevice(
        id=f"npu{index}", index=index, model="sim", total_mib=8192, healthy=healthy, reason=reason
    )
    return DeviceEntry(device=device, total_mib=8192, slice_mib=1024, slices=8)


def test_container_edits_depend_on_the_device_and_the_count_only():
    edits = container_edits(entry(), 3, SimulatedBackend(spec="4x8192"), socket_root="/run/vnpu/devices")
    assert dict(edits.env) == {
        "ASCEND_VISIBLE_DEVICES": "3",
        contract.ENV_DEVICE: "npu3",
        contract.ENV_MEMORY_LIMIT_MIB: "3072",
        contract.ENV_SLICES: "3",
        contract.ENV_SLICE_MIB: "1024",
        contract.ENV_SOCKET_DIR: contract.SOCKET_DIR_IN_CONTAINER,
    }
    assert edits.mounts == (Mount("/run/vnpu/devices/npu3", contract.SOCKET_DIR_IN_CONTAINER),)
    assert edits.device_nodes == ()


@pytest.mark.parametrize(
    ("device", "count", "message"),
    [
        (entry(healthy=False, reason="ECC storm"), 1, "npu3 is unhealthy: ECC storm"),
        (entry(), 0, "0 cannot be allocated"),
        (entry(), 9, "has 8 slices; 9 cannot"),
    ],
)
def test_container_edits_refuse_unhealthy_devices_and_impossible_counts(device, count, message):
    with pytest.raises(AllocationError, match=message):
        container_edits(device, count, SimulatedBackend(spec="1x8192"), socket_root="/x")


@pytest.mark.parametrize(
    ("device_id", "name"),
    [("npu0", "npu0"), ("GPU-8f2e:1a", "GPU-8f2e_1a"), ("../etc", ".._etc"), ("a/b", "a_b")],
)
def test_a_device_id_becomes_one_safe_directory_name(device_id, name):
    assert contract.device_socket_dir("/root", device_id) == Path("/root") / name
    assert "/" not in contract.device_dir_name(device_id)


@pytest.mark.parametrize("device_id", ["", ".", ".."])
def test_a_device_id_that_cannot_name_a_directory_is_refused(device_id):
    with pytest.raises(ValueError, match="cannot name a directory"):
        contract.device_dir_name(device_id)
