"""The plugin under the kubelet's complete device manager (ManagerImpl of k8s.io/kubernetes v1.34.4, in
the Go harness's manager mode), with one resource per device (``vnpu.io/memory-<index>``): the kubelet's
own admission logic enforces each device's capacity, a multi-container pod gets each container's own
device, and the kubelet's checkpoint and ours agree across kubelet and plugin restarts (the kubelet's
pod-resources server over the same manager is what the plugin reconciles with). The plugin runs with
its default paths under /var/lib/kubelet."""

from __future__ import annotations

import sys

import pytest
from dp_helpers import TWO_DEVICES, scrape, wait_for, write_devices

from vnpu.api import device_resource, parse_slice_id
from vnpu.cluster.controlplane import free_port
from vnpu.device_plugin import contract

pytestmark = pytest.mark.goharness

R0, R1 = device_resource(0), device_resource(1)


def plugin_argv(dirs, port: int, *extra: str) -> list[str]:
    # Default --plugin-dir, --pod-resources-socket and --state-dir: the kubelet's real paths (tmpfs).
    return [sys.executable, "-m", "vnpu", "device-plugin", "--backend", "simulated", "--simulated-config",
            str(dirs.devices_file), "--socket-root", str(dirs.socket_root), "--metrics-port", str(port),
            "--release-grace", "1", "--reconcile-interval", "0.5", *extra]  # fmt: skip


def capacities(node) -> dict[str, int]:
    """resource -> allocatable, for every vnpu resource the kubelet knows."""
    reply = node.call("capacity")
    if reply["kind"] != "capacity":
        return {}
    return {r: v["allocatable"] for r, v in reply["resources"].items() if r.startswith("vnpu.io/")}


def admit(node, name: str, slices: int, resource: str, uid: str | None = None) -> dict:
    pod = {"namespace": "ns", "name": name, "uid": uid or f"uid-{name}"}
    reply = node.call("admit", pod=pod, slices=slices, resource=resource)
    assert reply["kind"] == "admitted", reply
    return reply


def devices_of(reply: dict) -> set[str]:
    return {parse_slice_id(s)[0] for s in reply["ids"]}


def metrics(port: int) -> dict[str, float]:
    """The plugin's metrics, or {} while its endpoint is not up (e.g. just after a restart)."""
    try:
        return scrape(port)
    except OSError:
        return {}


def allocated(port: int) -> dict[str, float]:
    m = metrics(port)
    return {
        d: m.get(f'vnpu_device_slices_allocated{{device="{d}",model="sim-910B"}}') for d in ("npu0", "npu1")
    }


def registered(port: int, times: int) -> bool:
    return metrics(port).get("vnpu_kubelet_registrations_total", 0) >= times


def test_kubelet_admission_per_device_capacity_restarts_and_reconcile(kubelet_node, dirs):
    write_devices(dirs.devices_file, TWO_DEVICES)
    port = free_port()
    kubelet_node.call("manager_start")
    kubelet_node.call("plugin_start", argv=plugin_argv(dirs, port), log=str(dirs.root / "plugin.log"))
    wait_for(lambda: capacities(kubelet_node) == {R0: 4, R1: 8}, timeout=20, what="one resource per device")

    # The resource names the device: the kubelet's own allocator can only hand out that device's slices.
    a = admit(kubelet_node, "a", 3, R0)
    assert devices_of(a) == {"npu0"} and a["envs"][contract.ENV_DEVICE] == "npu0"
    assert a["mounts"] == [
        {"container_path": contract.SOCKET_DIR_IN_CONTAINER, "host_path": str(dirs.socket_root / "npu0"),
         "read_only": False}
    ]  # fmt: skip
    b = admit(kubelet_node, "b", 4, R1)
    assert devices_of(b) == {"npu1"} and b["envs"][contract.ENV_MEMORY_LIMIT_MIB] == "4096"
    # npu0 has 1 slice left: the kubelet itself refuses 2 (per-device capacity, not a node total of 5).
    refused = kubelet_node.call("admit", pod={"namespace": "ns", "name": "x", "uid": "uid-x"}, slices=2,
                                resource=R0)  # fmt: skip
    assert refused["kind"] == "error" and "Requested: 2, Available: 1" in refused["error"], refused

    # A pod of three containers on two devices: each container gets its own device's slices and envs.
    multi = kubelet_node.call(
        "admit",
        pod={"namespace": "ns", "name": "multi", "uid": "uid-multi"},
        containers=[
            {"name": "first", "resource": R1, "slices": 1},
            {"name": "second", "resource": R0, "slices": 1},
            {"name": "third", "resource": R1, "slices": 2},
        ],
    )
    assert multi["kind"] == "admitted", multi
    got = {c["name"]: (devices_of(c), c["envs"][contract.ENV_DEVICE], c["envs"][contract.ENV_SLICES])
           for c in multi["containers"]}  # fmt: skip
    assert got == {"first": ({"npu1"}, "npu1", "1"), "second": ({"npu0"}, "npu0", "1"),
                   "third": ({"npu1"}, "npu1", "2")}  # fmt: skip
    ids = [i for c in multi["containers"] for i in c["ids"]] + a["ids"] + b["ids"]
    assert len(ids) == len(set(ids)) == 11  # nothing handed out twice

    # Kubelet restart: a new device manager reads the kubelet's checkpoint; every endpoint re-registers.
    kubelet_node.call("manager_stop")
    kubelet_node.call("manager_start")
    wait_for(lambda: capacities(kubelet_node) == {R0: 4, R1: 8}, timeout=30, what="capacity after restart")
    wait_for(lambda: registered(port, 4), timeout=30, what="both endpoints registered again")
    c = admit(kubelet_node, "c", 1, R1)
    assert c["ids"] == ["npu1-s7"]  # npu1's last free slice: the kubelet kept b and multi

    # Plugin crash while pod b ends: the restarted plugin restores its checkpoint and reconciles with
    # the kubelet's pod-resources API, which no longer lists b.
    kubelet_node.call("plugin_kill")
    kubelet_node.call("remove_pod", pod={"uid": "uid-b"})
    kubelet_node.call("plugin_start", argv=plugin_argv(dirs, port), log=str(dirs.root / "plugin.log"))
    # (The kubelet keeps a dead plugin's capacity for a grace period: wait for the new registrations.)
    wait_for(lambda: registered(port, 2), timeout=20, what="the restarted plugin's registrations")
    wait_for(
        lambda: allocated(port) == {"npu0": 4, "npu1": 4}, timeout=10, what="a, multi, c held; b released"
    )
    e = admit(kubelet_node, "e", 4, R1)
    held = set(c["ids"]) | set(ids) - set(b["ids"])  # b's slices were released: e may reuse them
    assert devices_of(e) == {"npu1"} and not set(e["ids"]) & held
    assert allocated(port) == {"npu0": 4, "npu1": 8}
    assert kubelet_node.call("plugin_stop")["code"] == 0
