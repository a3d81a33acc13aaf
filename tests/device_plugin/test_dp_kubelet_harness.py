"""Wire compatibility with the kubelet: the Go harness runs the kubelet's own device-plugin registration
server and plugin client (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1, v1.34.4) and
its pod-resources v1 server against our Python plugin — one registration and one endpoint per device —
and prints what the kubelet saw as JSON."""

from __future__ import annotations

import time

import pytest
from dp_helpers import TWO_DEVICES, scrape, wait_for, write_devices

from vnpu.api import device_resource
from vnpu.cluster.controlplane import free_port
from vnpu.device_plugin import contract

pytestmark = pytest.mark.goharness

R0, R1 = device_resource(0), device_resource(1)
NPU0 = [f"npu0-s{i}" for i in range(4)]
NPU1 = [f"npu1-s{i}" for i in range(8)]


def connected(resource: str | None = None):
    return lambda e: e["kind"] == "connected" and resource in (None, e["resource"])


def devices_event(resource: str | None = None):
    return lambda e: e["kind"] == "devices" and resource in (None, e["resource"])


def test_one_registration_per_device_with_its_own_capacity(harness, run_plugin, dirs):
    assert harness.call("start")["kind"] == "started"
    run_plugin()
    for resource, socket, slices, numa in (
        (R0, "vnpu-memory-0.sock", NPU0, 0),
        (R1, "vnpu-memory-1.sock", NPU1, 1),
    ):
        event = harness.wait_event(connected(resource))
        assert event["socket"] == str(dirs.plugin_dir / socket)
        devices = harness.wait_event(devices_event(resource))
        assert (devices["total"], devices["healthy"]) == (len(slices), len(slices))
        assert [d["id"] for d in devices["devices"]] == slices
        assert {tuple(d["numa"]) for d in devices["devices"]} == {(numa,)}
        options = harness.call("options", resource=resource)
        assert (
            options["get_preferred_allocation_available"] is True and options["pre_start_required"] is False
        )
        assert harness.call("prestart", ids=slices[:1], resource=resource)["kind"] == "prestart"
    assert harness.call("options", resource="vnpu.io/memory")["kind"] == "error"  # no aggregate resource


def test_plugin_started_before_the_kubelet_registers_once_it_appears(harness, run_plugin):
    run_plugin()
    time.sleep(0.5)  # nothing listens on kubelet.sock yet
    started = harness.call("start")
    for resource in (R0, R1):
        event = harness.wait_event(connected(resource))
        assert event["t"] - started["t"] < 5000  # at once, not after a registration backoff


def test_allocate_and_preferred_allocation_through_the_kubelet_client(harness, run_plugin, dirs):
    harness.call("start")
    run_plugin(slice_mib=1024)
    harness.wait_event(devices_event(R1))
    pref = harness.call("preferred", available=NPU1, must=[], size=3, resource=R1)
    assert pref["ids"] == ["npu1-s0", "npu1-s1", "npu1-s2"]
    pref = harness.call("preferred", available=NPU1, must=["npu1-s6"], size=2, resource=R1)
    assert pref["ids"] == ["npu1-s6", "npu1-s0"]
    resp = harness.call("allocate", ids=["npu1-s0", "npu1-s1"], resource=R1)
    assert resp["kind"] == "allocate"
    assert resp["envs"] == {
        "ASCEND_VISIBLE_DEVICES": "1",
        "VNPU_DEVICE": "npu1",
        "VNPU_MEMORY_LIMIT_MIB": "2048",
        "VNPU_SLICES": "2",
        "VNPU_SLICE_MIB": "1024",
        "VNPU_SOCKET_DIR": contract.SOCKET_DIR_IN_CONTAINER,
    }
    assert resp["mounts"] == [
        {"container_path": contract.SOCKET_DIR_IN_CONTAINER, "host_path": str(dirs.socket_root / "npu1"),
         "read_only": False}
    ]  # fmt: skip
    assert resp["devices"] == [] and resp["cdi_devices"] == []
    assert resp["annotations"] == {"vnpu.io/allocated-device": "npu1"}
    # A slice of another device through this device's endpoint is refused.
    refused = harness.call("allocate", ids=["npu1-s3", "npu0-s3"], resource=R1)
    assert refused["kind"] == "error" and "'npu0-s3' is a slice of npu0, not of npu1" in refused["error"]


def test_health_flips_reach_the_kubelet_within_a_second_both_ways(harness, run_plugin, dirs):
    harness.call("start")
    # A 0.1 s backend poll: a change is sent when the poll sees it, well inside the second (at the
    # default 0.5 s a write just after a poll left under 0.5 s for a loaded machine to deliver it).
    run_plugin(health_interval_s=0.1)
    harness.wait_event(devices_event(R1))
    for devices, healthy in [
        ([TWO_DEVICES[0], dict(TWO_DEVICES[1], health="Unhealthy", reason="ECC")], 0),
        (TWO_DEVICES, 8),
    ]:
        mark = harness.mark()
        written_ms = time.time() * 1000
        write_devices(dirs.devices_file, devices)
        event = harness.wait_event(devices_event(R1), after=mark, timeout=5)
        assert event["healthy"] == healthy and event["total"] == 8
        assert event["t"] - written_ms < 1000, (
            f"kubelet saw the change after {event['t'] - written_ms:.0f} ms"
        )


def test_kubelet_restart_makes_the_plugin_register_again_within_two_seconds(harness, plugin_process, dirs):
    harness.call("start")
    plugin = plugin_process("--no-api", "--metrics-port", "0")
    for resource in (R0, R1):
        harness.wait_event(connected(resource), timeout=20)
    for _ in range(2):  # twice: re-registration must keep working
        mark = harness.mark()
        harness.call("stop")  # kubelet exits: its clients disconnect, kubelet.sock goes away
        harness.wait_event(lambda e: e["kind"] == "disconnected", after=mark)
        time.sleep(0.5)  # kubelet down for a moment
        started = harness.call("start")  # kubelet starts: wipes the plugin sockets, creates kubelet.sock
        cleanup = harness.wait_event(lambda e: e["kind"] == "cleanup", after=mark)
        assert {"vnpu-memory-0.sock", "vnpu-memory-1.sock"} <= set(cleanup["removed"])
        for resource, total in ((R0, 4), (R1, 8)):
            event = harness.wait_event(connected(resource), after=mark, timeout=15)
            # At once, not after a registration backoff (a subprocess re-serves two endpoints first).
            assert event["t"] - started["t"] < 5000, f"re-registered after {event['t'] - started['t']} ms"
            devices = harness.wait_event(devices_event(resource), after=mark)
            assert devices["total"] == total
    assert harness.call("allocate", ids=["npu0-s0"], resource=R0)["kind"] == "allocate"
    assert plugin.terminate() == 0
    assert not list(dirs.plugin_dir.glob("vnpu-memory-*.sock"))


def test_plugin_restart_rebuilds_allocations_from_checkpoint_and_pod_resources(harness, plugin_process, dirs):
    write_devices(dirs.devices_file, TWO_DEVICES)
    harness.call("start")
    harness.call("serve_podresources", socket=str(dirs.pod_resources_socket))
    port = free_port()
    args = ("--no-api", "--metrics-port", str(port), "--release-grace", "1", "--reconcile-interval", "0.5")
    plugin = plugin_process(*args)
    for resource in (R0, R1):
        harness.wait_event(connected(resource), timeout=20)
    pod_a = {"namespace": "ns", "name": "a", "uid": "uid-a"}
    pod_b = {"namespace": "ns", "name": "b", "uid": "uid-b"}
    allocate_a = harness.call("allocate", ids=["npu1-s0", "npu1-s1", "npu1-s2"], pod=pod_a, resource=R1)
    assert allocate_a["kind"] == "allocate"
    assert harness.call("allocate", ids=["npu0-s0", "npu0-s1"], pod=pod_b, resource=R0)["kind"] == "allocate"
    assert scrape(port)['vnpu_device_slices_allocated{device="npu1",model="sim-910B"}'] == 3

    mark = harness.mark()
    plugin.kill()  # crash: no cleanup
    harness.wait_event(lambda e: e["kind"] == "disconnected", after=mark)
    harness.call("remove_pod", pod=pod_b)  # b finished while the plugin was down
    plugin = plugin_process(*args)
    for resource in (R0, R1):
        harness.wait_event(connected(resource), after=mark, timeout=20)

    def allocated():
        m = scrape(port)
        return {
            d: m[f'vnpu_device_slices_allocated{{device="{d}",model="sim-910B"}}'] for d in ("npu0", "npu1")
        }

    # a's slices survive (checkpoint + pod-resources), b's are released (pod-resources no longer lists them).
    assert wait_for(lambda: allocated() == {"npu0": 0, "npu1": 3} and allocated(), timeout=10)
    # The kubelet (its state lost) offers every slice: the plugin still keeps a's slices out of a new pick.
    pref = harness.call("preferred", available=NPU1, must=[], size=5, resource=R1)
    assert pref["ids"] == ["npu1-s3", "npu1-s4", "npu1-s5", "npu1-s6", "npu1-s7"]
    pod_c = {"namespace": "ns", "name": "c", "uid": "uid-c"}
    assert harness.call("allocate", ids=pref["ids"], pod=pod_c, resource=R1)["kind"] == "allocate"
    assert allocated() == {"npu0": 0, "npu1": 8}  # 3 + 5 on npu1, nothing counted twice
    restored = [e for e in plugin.log_lines() if e.get("msg") == "plugin starting"]
    assert [e["restored_slices"] for e in restored] == [0, 5]
    assert plugin.terminate() == 0
