"""Wire compatibility with the kubelet: the Go harness runs the kubelet's own device-plugin registration
server and plugin client (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1, v1.34.4) and
its pod-resources v1 server against our Python plugin, and prints what the kubelet saw as JSON."""

from __future__ import annotations

import time

import pytest
from dp_helpers import TWO_DEVICES, scrape, wait_for, write_devices

from vnpu.api import RESOURCE_MEMORY
from vnpu.cluster.controlplane import free_port

pytestmark = pytest.mark.goharness

ALL_SLICES = [f"npu0-s{i}" for i in range(4)] + [f"npu1-s{i}" for i in range(8)]


def connected(e):
    return e["kind"] == "connected"


def devices_event(e):
    return e["kind"] == "devices"


def test_registration_capacity_and_options(harness, run_plugin, dirs):
    assert harness.call("start")["kind"] == "started"
    run_plugin()
    event = harness.wait_event(connected)
    assert event["resource"] == RESOURCE_MEMORY
    assert event["socket"] == str(dirs.plugin_dir / "vnpu-memory.sock")
    devices = harness.wait_event(devices_event)
    assert (devices["total"], devices["healthy"]) == (12, 12)
    assert [d["id"] for d in devices["devices"]] == ALL_SLICES
    assert [d["numa"] for d in devices["devices"]] == [[0]] * 4 + [[1]] * 8
    options = harness.call("options")
    assert options["get_preferred_allocation_available"] is True and options["pre_start_required"] is False
    assert harness.call("prestart", ids=["npu0-s0"])["kind"] == "prestart"


def test_plugin_started_before_the_kubelet_registers_once_it_appears(harness, run_plugin):
    run_plugin()
    time.sleep(0.5)  # nothing listens on kubelet.sock yet
    started = harness.call("start")
    event = harness.wait_event(connected)
    assert event["t"] - started["t"] < 2000


def test_allocate_and_preferred_allocation_through_the_kubelet_client(harness, run_plugin):
    harness.call("start")
    run_plugin(slice_mib=1024)
    harness.wait_event(devices_event)
    pref = harness.call("preferred", available=ALL_SLICES, must=[], size=3)
    assert pref["ids"] == ["npu0-s0", "npu0-s1", "npu0-s2"]
    pref = harness.call("preferred", available=ALL_SLICES, must=["npu1-s6"], size=2)
    assert pref["ids"] == ["npu1-s6", "npu1-s0"]
    resp = harness.call("allocate", ids=["npu1-s0", "npu1-s1"])
    assert resp["kind"] == "allocate"
    assert resp["envs"] == {
        "ASCEND_VISIBLE_DEVICES": "1",
        "VNPU_DEVICE": "npu1",
        "VNPU_MEMORY_LIMIT_MIB": "2048",
        "VNPU_SLICES": "2",
        "VNPU_SLICE_MIB": "1024",
        "VNPU_SHARE_GROUP": "",
    }
    assert resp["mounts"] == [] and resp["devices"] == [] and resp["cdi_devices"] == []
    refused = harness.call("allocate", ids=["npu0-s3", "npu1-s3"])
    assert refused["kind"] == "error" and "span 2 physical devices" in refused["error"]


def test_health_flips_reach_the_kubelet_within_a_second_both_ways(harness, run_plugin, dirs):
    harness.call("start")
    run_plugin()  # default 0.5 s backend poll
    harness.wait_event(devices_event)
    for devices, healthy in [
        ([TWO_DEVICES[0], dict(TWO_DEVICES[1], health="Unhealthy", reason="ECC")], 4),
        (TWO_DEVICES, 12),
    ]:
        mark = harness.mark()
        written_ms = time.time() * 1000
        write_devices(dirs.devices_file, devices)
        event = harness.wait_event(devices_event, after=mark, timeout=5)
        assert event["healthy"] == healthy and event["total"] == 12
        assert event["t"] - written_ms < 1000, (
            f"kubelet saw the change after {event['t'] - written_ms:.0f} ms"
        )


def test_kubelet_restart_makes_the_plugin_register_again_within_two_seconds(harness, plugin_process, dirs):
    harness.call("start")
    plugin = plugin_process("--no-api", "--metrics-port", "0")
    harness.wait_event(connected, timeout=20)
    for _ in range(2):  # twice: re-registration must keep working
        mark = harness.mark()
        harness.call("stop")  # kubelet exits: its clients disconnect, kubelet.sock goes away
        harness.wait_event(lambda e: e["kind"] == "disconnected", after=mark)
        time.sleep(0.5)  # kubelet down for a moment
        started = harness.call("start")  # kubelet starts: wipes the plugin socket, creates kubelet.sock
        cleanup = harness.wait_event(lambda e: e["kind"] == "cleanup", after=mark)
        assert "vnpu-memory.sock" in cleanup["removed"]
        event = harness.wait_event(connected, after=mark, timeout=5)
        assert event["t"] - started["t"] < 2000, f"re-registered after {event['t'] - started['t']} ms"
        devices = harness.wait_event(devices_event, after=mark)
        assert devices["total"] == 12
    assert harness.call("allocate", ids=["npu0-s0"])["kind"] == "allocate"
    assert plugin.terminate() == 0
    assert not (dirs.plugin_dir / "vnpu-memory.sock").exists()


def test_plugin_restart_rebuilds_allocations_from_checkpoint_and_pod_resources(harness, plugin_process, dirs):
    write_devices(dirs.devices_file, TWO_DEVICES)
    harness.call("start")
    harness.call("serve_podresources", socket=str(dirs.pod_resources_socket))
    port = free_port()
    args = ("--no-api", "--metrics-port", str(port), "--release-grace", "0")
    plugin = plugin_process(*args)
    harness.wait_event(connected, timeout=20)
    pod_a = {"namespace": "ns", "name": "a", "uid": "uid-a"}
    pod_b = {"namespace": "ns", "name": "b", "uid": "uid-b"}
    assert harness.call("allocate", ids=["npu1-s0", "npu1-s1", "npu1-s2"], pod=pod_a)["kind"] == "allocate"
    assert harness.call("allocate", ids=["npu0-s0", "npu0-s1"], pod=pod_b)["kind"] == "allocate"
    assert scrape(port)['vnpu_device_slices_allocated{device="npu1",model="sim-910B"}'] == 3

    mark = harness.mark()
    plugin.kill()  # crash: no cleanup
    harness.wait_event(lambda e: e["kind"] == "disconnected", after=mark)
    harness.call("remove_pod", pod=pod_b)  # b finished while the plugin was down
    plugin = plugin_process(*args)
    harness.wait_event(connected, after=mark, timeout=20)

    def allocated():
        m = scrape(port)
        return {
            d: m[f'vnpu_device_slices_allocated{{device="{d}",model="sim-910B"}}'] for d in ("npu0", "npu1")
        }

    # a's slices survive (checkpoint + pod-resources), b's are released (pod-resources no longer lists them).
    assert wait_for(lambda: allocated() == {"npu0": 0, "npu1": 3} and allocated(), timeout=10)
    # The kubelet (its state lost) offers every slice: the plugin still keeps a's slices out of a new pick.
    pref = harness.call("preferred", available=ALL_SLICES, must=[], size=5)
    assert pref["ids"] == ["npu1-s3", "npu1-s4", "npu1-s5", "npu1-s6", "npu1-s7"]
    pod_c = {"namespace": "ns", "name": "c", "uid": "uid-c"}
    assert harness.call("allocate", ids=pref["ids"], pod=pod_c)["kind"] == "allocate"
    assert allocated() == {"npu0": 0, "npu1": 8}  # 3 + 5 on npu1, nothing counted twice
    restored = [e for e in plugin.log_lines() if e.get("msg") == "plugin starting"]
    assert [e["restored_slices"] for e in restored] == [0, 5]
    assert plugin.terminate() == 0
