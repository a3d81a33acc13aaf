"""The device table: merge rules, versioning, inventory, and the health monitor's handling of bad output."""

from __future__ import annotations

import logging
import threading

from vnpu.device_plugin.backends.base import Backend, BackendError, PhysicalDevice
from vnpu.device_plugin.devices import MAX_SLICES_PER_DEVICE, DeviceTable, HealthMonitor, merge
from vnpu.device_plugin.service import list_and_watch_response
from vnpu.inventory import NodeInventory


def dev(i: int, total: int | None = 4096, **kw) -> PhysicalDevice:
    return PhysicalDevice(id=f"npu{i}", index=i, model="m", total_mib=total, **kw)


def test_slices_follow_memory_and_slice_size():
    table = merge({}, [dev(0, 4096), dev(1, 3000)], slice_mib=1024)
    assert [(e.id, e.slices) for e in table.values()] == [("npu0", 4), ("npu1", 2)]
    assert table["npu0"].slice_ids() == ["npu0-s0", "npu0-s1", "npu0-s2", "npu0-s3"]


def test_unknown_size_keeps_the_last_known_layout_and_marks_unhealthy():
    before = merge({}, [dev(0)], slice_mib=1024)
    after = merge(before, [dev(0, None)], slice_mib=1024)
    assert after["npu0"].slices == 4 and not after["npu0"].healthy
    assert after["npu0"].reason == "device memory size unknown"
    never_known = merge({}, [dev(0, None)], slice_mib=1024)
    assert never_known["npu0"].slices == 0 and not never_known["npu0"].healthy


def test_backend_failure_or_a_vanished_device_turns_unhealthy_instead_of_disappearing():
    before = merge({}, [dev(0), dev(1)], slice_mib=1024)
    failed = merge(before, BackendError("npu-smi exited 1"), slice_mib=1024)
    assert [(e.healthy, e.reason) for e in failed.values()] == [(False, "npu-smi exited 1")] * 2
    vanished = merge(before, [dev(0)], slice_mib=1024)
    assert vanished["npu0"].healthy and not vanished["npu1"].healthy
    assert "no longer reported" in vanished["npu1"].reason


def test_device_smaller_than_a_slice_or_with_too_long_an_id_is_unhealthy():
    table = merge({}, [dev(0, 512), PhysicalDevice(id="x" * 60, index=1, model="m", total_mib=20480)], 1024)
    small, long_id = table.values()
    assert not small.healthy and "smaller than one slice" in small.reason
    assert not long_id.healthy and long_id.slices == 0 and "too long" in long_id.reason


def test_an_index_stays_with_its_first_device_over_many_polls():
    clash = [dev(0), PhysicalDevice(id="npu1", index=0, model="m", total_mib=4096)]
    table: dict = {}
    for _ in range(3):  # the same report every poll: nothing may change hands
        table = merge(table, clash, slice_mib=1024)
        assert [(e.id, e.healthy, e.reason) for e in table.values()] == [
            ("npu0", True, ""),
            ("npu1", False, "device index 0 is already npu0's"),
        ]


def test_a_first_table_gives_a_contested_index_to_the_device_whose_slices_are_held():
    """A restarted plugin has no previous table: the index went to the lower ID, and a running pod's
    resource (``vnpu.io/memory-0``, its slices on npu1) passed to npu0 while npu1 turned Unhealthy."""
    clash = [dev(0), PhysicalDevice(id="npu1", index=0, model="m", total_mib=4096)]
    table = merge({}, clash, slice_mib=1024, holding=lambda: {"npu1"})
    assert [(e.id, e.healthy, e.reason) for e in table.values()] == [
        ("npu0", False, "device index 0 is already npu1's"),
        ("npu1", True, ""),
    ]

    # Once a table exists, its owner keeps the index whatever is held; uncontested, nobody counts.
    def not_asked() -> set[str]:
        raise AssertionError("the ledger was counted with nothing contested")

    assert merge(table, clash, slice_mib=1024, holding=not_asked)["npu1"].healthy
    assert merge({}, [dev(0), dev(1)], slice_mib=1024, holding=not_asked)["npu1"].healthy


def test_a_device_whose_id_names_another_devices_socket_directory_is_unhealthy():
    """``npu:0`` and ``npu_0`` both name the socket directory ``npu_0``: the pods of both devices got
    one directory, each able to reach the other's weight-holders, and both devices were Healthy."""
    clash = [
        PhysicalDevice(id="npu:0", index=0, model="m", total_mib=4096),
        PhysicalDevice(id="npu_0", index=1, model="m", total_mib=4096),
    ]
    table: dict = {}
    for _ in range(3):  # the same report every poll: nothing may change hands
        table = merge(table, clash, slice_mib=1024)
        assert [(e.id, e.healthy, e.reason) for e in table.values()] == [
            ("npu:0", True, ""),
            ("npu_0", False, "device id 'npu_0' names the socket directory 'npu_0', which device 'npu:0' "
             "already has: give one of them another ID"),
        ]  # fmt: skip
    # A device reported first in a later poll does not take the directory from the one holding it.
    later = merge(merge({}, clash[1:], slice_mib=1024), clash, slice_mib=1024)
    assert [(e.id, e.healthy) for e in later.values()] == [("npu:0", False), ("npu_0", True)]


def test_a_device_with_more_slices_than_a_message_can_carry_is_unhealthy_without_them():
    # The largest layout allowed, with the longest slice IDs and the widest NUMA ID, fits a ListAndWatch
    # message with room to spare (the kubelet takes at most 4 MiB).
    widest = PhysicalDevice(id="x" * 56, index=1, model="m", total_mib=MAX_SLICES_PER_DEVICE, numa_node=-1)
    (largest,) = merge({}, [widest], slice_mib=1).values()
    assert largest.healthy and largest.slices == MAX_SLICES_PER_DEVICE
    assert len(list_and_watch_response(largest).SerializeToString()) < 2 * 2**20
    # npu-smi's 0xFFFFFFFF sentinel, or any absurd size: unhealthy, the size named, no slice list built.
    for total in (0xFFFFFFFF, 9999999999999, (MAX_SLICES_PER_DEVICE + 1) * 1024):
        (entry,) = merge({}, [dev(0, total)], slice_mib=1024).values()
        assert (entry.healthy, entry.slices) == (False, 0)
        assert entry.reason == (
            f"device memory {total} MiB is {total // 1024} slices of 1024 MiB, more than the"
            f" {MAX_SLICES_PER_DEVICE} one device may advertise: a bogus memory report, or raise --slice-mib"
        )
    # A device already known keeps its layout (same slice IDs, now Unhealthy), as for an unreadable size.
    before = merge({}, [dev(0)], slice_mib=1024)
    after = merge(before, [dev(0, 0xFFFFFFFF)], slice_mib=1024)
    assert after["npu0"].slice_ids() == before["npu0"].slice_ids() and not after["npu0"].healthy
    assert "device memory 4294967295 MiB" in after["npu0"].reason


def test_version_changes_only_on_visible_changes():
    table = DeviceTable(slice_mib=1024)
    table.update([dev(0, used_mib=1)])
    v = table.version
    table.update([dev(0, used_mib=999)])  # memory usage: metrics only, no ListAndWatch message
    assert table.version == v and table.entries()[0].device.used_mib == 999
    table.update([dev(0, healthy=False, reason="hot")])
    assert table.version == v + 1


def test_wait_for_change_wakes_on_update_and_on_stop():
    table = DeviceTable(slice_mib=1024)
    table.update([dev(0)])
    seen = table.version
    threading.Timer(0.05, lambda: table.update([dev(0, healthy=False, reason="x")])).start()
    assert table.wait_for_change(seen, timeout=10) == seen + 1
    stop = threading.Event()
    threading.Timer(0.05, lambda: (stop.set(), table.wake_watchers())).start()
    assert table.wait_for_change(seen + 1, timeout=10, stop=stop) == seen + 1


def test_inventory_is_the_shared_annotation_format():
    table = DeviceTable(slice_mib=2048)
    table.update([dev(0, 8192, numa_node=1), dev(1, 8192, healthy=False, reason="ECC")])
    parsed = NodeInventory.from_json(table.inventory().to_json())
    first, second = parsed.devices
    assert (first.id, first.slices, first.slice_mib, first.numa_node, first.health) == (
        "npu0",
        4,
        2048,
        1,
        "Healthy",
    )
    assert (second.health, second.reason) == ("Unhealthy", "ECC")


class FlakyBackend(Backend):
    name = "flaky"

    def __init__(self) -> None:
        self.mode = "ok"

    def discover(self) -> list[PhysicalDevice]:
        if self.mode == "garbage":
            raise BackendError("npu-smi info output has no device table")
        if self.mode == "bug":
            raise KeyError("oops")
        if self.mode == "bad-report":  # a backend bug the table cannot take: a size that is no number
            return [dev(0, "4096")]  # type: ignore[arg-type]
        return [dev(0)]

    def container_env(self, device: PhysicalDevice) -> dict[str, str]:
        return {}


def test_monitor_marks_devices_unhealthy_with_a_logged_reason_and_recovers(caplog):
    backend, table = FlakyBackend(), DeviceTable(slice_mib=1024)
    monitor = HealthMonitor(backend, table, error_grace_s=0)  # (the grace: the test below)
    caplog.set_level(logging.INFO, logger="vnpu.device_plugin.devices")
    monitor.poll_once()
    backend.mode = "garbage"
    monitor.poll_once()
    assert not table.entries()[0].healthy
    assert "device npu0 became unhealthy: npu-smi info output has no device table" in caplog.text
    backend.mode = "bug"
    monitor.poll_once()  # an unexpected exception in a backend must not kill health reporting
    assert "flaky backend failed: KeyError('oops')" in table.entries()[0].reason
    backend.mode = "ok"
    monitor.poll_once()
    assert table.entries()[0].healthy and "device npu0 is healthy again" in caplog.text


def test_a_report_the_table_cannot_take_marks_devices_unhealthy_and_polling_goes_on(caplog):
    backend, table = FlakyBackend(), DeviceTable(slice_mib=1024)
    monitor = HealthMonitor(backend, table)
    monitor.poll_once()
    backend.mode = "bad-report"
    monitor.poll_once()  # must not raise: it runs on the health thread, which would die
    (entry,) = table.entries()
    assert not entry.healthy and entry.slices == 4
    assert entry.reason.startswith("flaky backend report could not be applied: TypeError(")
    assert "device table update failed" in caplog.text
    backend.mode = "ok"
    monitor.poll_once()
    assert table.entries()[0].healthy


def test_a_backend_failing_for_less_than_its_grace_changes_no_device(caplog):
    """One failed poll (npu-smi timing out under load) marked every device Unhealthy, and the
    operator re-placed every replica of the node at once. A backend failing as a whole now counts
    once it has failed for the grace period; a device a working backend reports Unhealthy is so at
    once."""
    caplog.set_level(logging.INFO, logger="vnpu.device_plugin.devices")
    now = [0.0]
    backend, table = FlakyBackend(), DeviceTable(slice_mib=1024)
    monitor = HealthMonitor(backend, table, error_grace_s=10, clock=lambda: now[0])
    monitor.poll_once()
    version = table.version
    backend.mode = "garbage"
    for now[0] in (0.5, 5.0, 9.9):
        monitor.poll_once()
    assert table.entries()[0].healthy and table.version == version
    assert caplog.text.count("backend poll failed") == 1  # once, not every poll
    backend.mode, now[0] = "ok", 10.2
    monitor.poll_once()
    assert "the backend answers again" in caplog.text
    backend.mode = "garbage"
    for now[0] in (11.0, 20.9):  # a new run of failures: its own grace
        monitor.poll_once()
    assert table.entries()[0].healthy
    now[0] = 21.0
    monitor.poll_once()
    assert not table.entries()[0].healthy
    assert "device npu0 became unhealthy: npu-smi info output has no device table" in caplog.text


def test_a_plugin_whose_backend_fails_from_its_start_leaves_the_node_annotation_as_it_was():
    """Applied at once, the first failed poll of a restarted plugin wrote an annotation with no device,
    and the operator re-placed every replica of the node ("device no longer exists")."""
    from test_dp_service import FakeNodes

    from vnpu.device_plugin.annotator import NodeAnnotator

    now = [0.0]
    backend, table = FlakyBackend(), DeviceTable(slice_mib=1024)
    backend.mode = "garbage"
    monitor = HealthMonitor(backend, table, error_grace_s=10, clock=lambda: now[0])
    nodes = FakeNodes()
    nodes.annotations["vnpu.io/devices"] = "as the plugin before this one wrote it"
    annotator = NodeAnnotator(nodes, "n1", table)
    monitor.poll_once()
    assert not table.reported and annotator.sync_once()
    assert nodes.annotations["vnpu.io/devices"] == "as the plugin before this one wrote it"
    backend.mode = "ok"
    monitor.poll_once()
    assert table.reported and annotator.sync_once()
    assert nodes.health() == {"npu0": ("Healthy", "")}
