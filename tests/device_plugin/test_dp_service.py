"""The plugin's gRPC service over its real unix socket, driven by a Python client (the Go harness
drives it with the kubelet's code)."""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from dp_helpers import (
    TWO_DEVICES,
    StreamWatcher,
    allocate,
    fake_npu_smi,
    preferred,
    scrape,
    wait_for,
    write_devices,
)

from vnpu.cluster.controlplane import free_port
from vnpu.device_plugin import contract
from vnpu.device_plugin.backends.ascend import AscendBackend
from vnpu.device_plugin.plugin import PluginRunner
from vnpu.device_plugin.proto import api_pb2

ALL_SLICES = [f"npu0-s{i}" for i in range(4)] + [f"npu1-s{i}" for i in range(8)]


def test_options_and_the_first_list(run_plugin, stub_for):
    stub = stub_for(run_plugin())
    options = stub.GetDevicePluginOptions(api_pb2.Empty())
    assert options.get_preferred_allocation_available and not options.pre_start_required
    watcher = StreamWatcher(stub)
    _, devices = watcher.next()
    assert list(devices) == ALL_SLICES and set(devices.values()) == {"Healthy"}
    first = next(iter(stub.ListAndWatch(api_pb2.Empty())))
    assert [d.topology.nodes[0].ID for d in first.devices] == [0] * 4 + [1] * 8
    assert stub.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=["npu0-s0"])) is not None
    watcher.close()


def test_health_flips_reach_listandwatch_within_a_second_both_ways(run_plugin, stub_for, dirs):
    # Default poll interval (0.5 s): the acceptance bar is an update within 1 s in both directions.
    watcher = StreamWatcher(stub_for(run_plugin()))
    watcher.next()
    sick = [dict(TWO_DEVICES[0]), dict(TWO_DEVICES[1], health="Unhealthy", reason="HBM ECC errors")]
    write_devices(dirs.devices_file, sick)
    _, devices = watcher.next(timeout=1.0)
    assert {h for s, h in devices.items() if s.startswith("npu1")} == {"Unhealthy"}
    assert {h for s, h in devices.items() if s.startswith("npu0")} == {"Healthy"}
    write_devices(dirs.devices_file, TWO_DEVICES)
    _, devices = watcher.next(timeout=1.0)
    assert set(devices.values()) == {"Healthy"}
    watcher.close()


def test_allocate_payload_for_simulated_devices(run_plugin, stub_for):
    stub = stub_for(run_plugin(slice_mib=1024))
    resp = allocate(stub, ["npu1-s2", "npu1-s3", "npu1-s4"])
    assert dict(resp.envs) == {
        "ASCEND_VISIBLE_DEVICES": "1",
        contract.ENV_DEVICE: "npu1",
        contract.ENV_MEMORY_LIMIT_MIB: "3072",
        contract.ENV_SLICES: "3",
        contract.ENV_SLICE_MIB: "1024",
        contract.ENV_SHARE_GROUP: "",
    }
    assert (
        not resp.mounts and not resp.devices
    )  # no share group without a matching pod; no /dev for simulated


def test_allocate_refuses_spanning_unknown_and_unhealthy(run_plugin, stub_for, dirs):
    stub = stub_for(run_plugin())
    for ids, message in [
        (["npu0-s0", "npu1-s0"], "span 2 physical devices"),
        (["npu7-s0"], "unknown device ID"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            allocate(stub, ids)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    write_devices(
        dirs.devices_file, [TWO_DEVICES[0], dict(TWO_DEVICES[1], health="Unhealthy", reason="overheated")]
    )
    with pytest.raises(grpc.RpcError) as err:
        wait_for(lambda: allocate(stub, ["npu1-s0"]) and False, timeout=3)
    assert "npu1 is unhealthy: overheated" in err.value.details()


def test_spanning_allowed_on_request(run_plugin, stub_for):
    resp = allocate(stub_for(run_plugin(allow_spanning=True)), ["npu0-s0", "npu1-s0"])
    assert resp.envs[contract.ENV_DEVICE] == "npu0,npu1" and resp.envs["ASCEND_VISIBLE_DEVICES"] == "0,1"
    assert resp.envs[contract.ENV_MEMORY_LIMIT_MIB] == "2048"


def test_preferred_allocation_keeps_one_device_and_best_fit(run_plugin, stub_for):
    stub = stub_for(run_plugin())
    assert preferred(stub, ALL_SLICES, 3) == ["npu0-s0", "npu0-s1", "npu0-s2"]
    assert preferred(stub, ALL_SLICES, 5) == [f"npu1-s{i}" for i in range(5)]
    assert preferred(stub, ALL_SLICES, 2, must=["npu1-s7"]) == ["npu1-s7", "npu1-s0"]


def test_malformed_backend_output_marks_devices_unhealthy_and_the_plugin_keeps_serving(
    run_plugin, stub_for, dirs, caplog
):
    caplog.set_level(logging.WARNING, logger="vnpu.device_plugin.devices")
    stub = stub_for(run_plugin(health_interval_s=0.1))
    watcher = StreamWatcher(stub)
    watcher.next()
    dirs.devices_file.write_text("devices: [{memory_mib: lots}]\n")
    _, devices = watcher.next(timeout=3)
    assert set(devices.values()) == {"Unhealthy"} and len(devices) == 12  # same IDs, now unhealthy
    assert "became unhealthy: simulated config device #0 is malformed" in caplog.text
    assert stub.GetDevicePluginOptions(api_pb2.Empty()).get_preferred_allocation_available  # still serving
    write_devices(dirs.devices_file, TWO_DEVICES)
    _, devices = watcher.next(timeout=3)
    assert set(devices.values()) == {"Healthy"}
    watcher.close()


def test_ascend_payload_has_device_nodes(dirs, tmp_path, stub_for):
    backend = AscendBackend(npu_smi=str(fake_npu_smi(tmp_path, "910b-8x-info.txt")), sysfs_root=tmp_path)
    with PluginRunner(dirs.config(backend="ascend", slice_mib=4096), backend=backend) as runner:
        stub = stub_for(runner)
        first = next(iter(stub.ListAndWatch(api_pb2.Empty())))
        assert len(first.devices) == 8 * 16  # 64 GiB HBM in 4 GiB slices on 8 chips
        resp = allocate(stub, ["npu6-s0", "npu6-s1"])
    assert resp.envs["ASCEND_VISIBLE_DEVICES"] == "6" and resp.envs[contract.ENV_MEMORY_LIMIT_MIB] == "8192"
    assert [(d.host_path, d.container_path, d.permissions) for d in resp.devices] == [
        (p, p, "rw") for p in ("/dev/davinci6", "/dev/davinci_manager", "/dev/devmm_svm", "/dev/hisi_hdc")
    ]


def test_metrics(run_plugin, stub_for, dirs):
    port = free_port()
    runner = run_plugin(devices=[dict(TWO_DEVICES[0], used_mib=100), TWO_DEVICES[1]], metrics_port=port)
    assert runner.metrics_port == port
    stub = stub_for(runner)
    allocate(stub, ["npu1-s0", "npu1-s1", "npu1-s2"])
    with pytest.raises(grpc.RpcError):
        allocate(stub, ["npu0-s0", "npu1-s3"])
    m = scrape(port)
    label = '{device="npu1",model="sim-910B"}'
    assert m[f"vnpu_device_slices_total{label}"] == 8
    assert m[f"vnpu_device_slices_allocated{label}"] == 3
    assert m[f"vnpu_device_slices_free{label}"] == 5
    assert m[f"vnpu_device_healthy{label}"] == 1
    assert m['vnpu_device_memory_used_bytes{device="npu0",model="sim-910B"}'] == 100 * 1024 * 1024
    assert m['vnpu_device_memory_total_bytes{device="npu0",model="sim-910B"}'] == 4096 * 1024 * 1024
    assert m["vnpu_allocate_duration_seconds_count"] == 2
    assert m["vnpu_allocate_errors_total"] == 1


def test_plugin_restart_restores_allocations_from_the_checkpoint(dirs, stub_for):
    write_devices(dirs.devices_file, TWO_DEVICES)
    with PluginRunner(dirs.config()) as first:
        allocate(stub_for(first), ["npu0-s0", "npu0-s1"])
    with PluginRunner(dirs.config()) as second:
        assert sorted(second.ledger.held()) == ["npu0-s0", "npu0-s1"]
        # A new 2-slice request avoids the held slices although the (restarted) kubelet offers them.
        assert preferred(stub_for(second), ALL_SLICES, 2) == ["npu0-s2", "npu0-s3"]


def test_stop_removes_the_socket_and_wakes_streams(run_plugin, stub_for):
    runner = run_plugin()
    watcher = StreamWatcher(stub_for(runner))
    watcher.next()
    started = time.monotonic()
    runner.stop()
    watcher.thread.join(5)
    assert not watcher.thread.is_alive() and time.monotonic() - started < 5
    assert not runner.config.socket_path.exists()


def test_a_removed_socket_is_served_again_once_and_stays(run_plugin, stub_for, caplog):
    # The kubelet deletes plugin sockets when it starts. gRPC unlinks a server's socket path when
    # that server stops, so the old server must be gone before the new one binds the same path.
    caplog.set_level(logging.WARNING, logger="vnpu.device_plugin.plugin")
    runner = run_plugin()
    runner.config.socket_path.unlink()
    wait_for(runner.config.socket_path.exists, timeout=5, what="socket served again")
    time.sleep(1.0)  # several watch intervals: the new socket must survive the old server's shutdown
    assert runner.config.socket_path.exists()
    assert caplog.text.count("plugin socket disappeared") == 1
    assert stub_for(runner).GetDevicePluginOptions(api_pb2.Empty()).get_preferred_allocation_available
