"""The plugin under the kubelet's complete device manager (ManagerImpl of k8s.io/kubernetes v1.34.4, in
the Go harness's manager mode): the kubelet's own admission logic asks our GetPreferredAllocation and
must end up with every request on one device, the kubelet's checkpoint and ours must agree across
kubelet and plugin restarts, and the kubelet's pod-resources server (over the same manager) is what
the plugin reconciles with. The plugin runs with its default paths under /var/lib/kubelet."""

from __future__ import annotations

import sys
import uuid

import pytest
from dp_helpers import TWO_DEVICES, scrape, wait_for, write_devices
from kubernetes import client

from vnpu.api import ANNOTATION_DEVICE, ANNOTATION_SHARE_GROUP, RESOURCE_MEMORY, parse_slice_id
from vnpu.cluster.controlplane import free_port
from vnpu.device_plugin import contract

pytestmark = pytest.mark.goharness


def plugin_argv(dirs, port: int, *extra: str) -> list[str]:
    # Default --plugin-dir, --pod-resources-socket and --state-dir: the kubelet's real paths (tmpfs).
    return [sys.executable, "-m", "vnpu", "device-plugin", "--backend", "simulated", "--simulated-config",
            str(dirs.devices_file), "--share-root", str(dirs.share_root), "--metrics-port", str(port),
            "--release-grace", "0", *extra]  # fmt: skip


def capacity(node) -> int:
    reply = node.call("capacity")
    return reply.get("allocatable", 0) if reply["kind"] == "capacity" else 0


def admit(node, name: str, slices: int, uid: str | None = None) -> dict:
    reply = node.call(
        "admit", pod={"namespace": "ns", "name": name, "uid": uid or f"uid-{name}"}, slices=slices
    )
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


def registered(port: int) -> bool:
    return metrics(port).get("vnpu_kubelet_registrations_total", 0) >= 1


def test_kubelet_admission_restarts_and_reconcile(kubelet_node, dirs):
    write_devices(dirs.devices_file, TWO_DEVICES)
    port = free_port()
    kubelet_node.call("manager_start")
    kubelet_node.call("plugin_start", argv=plugin_argv(dirs, port), log=str(dirs.root / "plugin.log"))
    wait_for(lambda: capacity(kubelet_node) == 12, timeout=20, what="kubelet capacity from the plugin")

    # The kubelet's allocator picks from unordered sets: single-device results come from our preference.
    a = admit(kubelet_node, "a", 3)
    assert devices_of(a) == {"npu0"} and a["envs"]["VNPU_DEVICE"] == "npu0"  # best fit: 4 free on npu0
    b = admit(kubelet_node, "b", 4)
    assert devices_of(b) == {"npu1"} and b["envs"][contract.ENV_MEMORY_LIMIT_MIB] == "4096"
    c = admit(kubelet_node, "c", 2)
    assert devices_of(c) == {"npu1"}

    # Kubelet restart: a new device manager reads the kubelet's checkpoint; the plugin re-registers.
    kubelet_node.call("manager_stop")
    kubelet_node.call("manager_start")
    wait_for(lambda: capacity(kubelet_node) == 12, timeout=5, what="capacity after the kubelet restart")
    d = admit(kubelet_node, "d", 1)
    assert d["ids"] == ["npu0-s3"]  # npu0's last free slice: the kubelet kept a, b, c

    # Plugin crash while pod b ends: the restarted plugin restores its checkpoint and reconciles with
    # the kubelet's pod-resources API, which no longer lists b.
    kubelet_node.call("plugin_kill")
    kubelet_node.call("remove_pod", pod={"uid": "uid-b"})
    kubelet_node.call("plugin_start", argv=plugin_argv(dirs, port), log=str(dirs.root / "plugin.log"))
    # (The kubelet keeps a dead plugin's capacity for a grace period: wait for the new registration.)
    wait_for(lambda: registered(port), timeout=20, what="the restarted plugin's registration")
    wait_for(lambda: allocated(port) == {"npu0": 4, "npu1": 2}, timeout=10, what="a, c, d held; b released")
    e = admit(kubelet_node, "e", 4)
    assert devices_of(e) == {"npu1"} and not set(e["ids"]) & set(c["ids"])
    assert allocated(port) == {"npu0": 4, "npu1": 6}
    assert kubelet_node.call("plugin_stop")["code"] == 0


@pytest.mark.integration
def test_kubelet_admission_honours_the_operators_device_and_mounts_the_share_group(
    kubelet_node, dirs, control_plane, namespace
):
    core = client.CoreV1Api(control_plane.api_client())
    node_name = f"dp-{uuid.uuid4().hex[:8]}"
    core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node_name)))
    try:
        pod = core.create_namespaced_pod(namespace, client.V1Pod(
            metadata=client.V1ObjectMeta(name="replica", annotations={
                ANNOTATION_DEVICE: "npu1", ANNOTATION_SHARE_GROUP: "llama-abc"}),
            spec=client.V1PodSpec(node_name=node_name, containers=[client.V1Container(
                name="main", image="local.test/busybox", resources=client.V1ResourceRequirements(
                    limits={RESOURCE_MEMORY: "2"}, requests={RESOURCE_MEMORY: "2"}))]),
        ))  # fmt: skip
        write_devices(dirs.devices_file, TWO_DEVICES)
        port = free_port()
        argv = plugin_argv(
            dirs, port, "--kubeconfig", str(control_plane.kubeconfig), "--node-name", node_name
        )
        kubelet_node.call("manager_start")
        kubelet_node.call("plugin_start", argv=argv, log=str(dirs.root / "plugin.log"))
        wait_for(lambda: capacity(kubelet_node) == 12, timeout=20, what="kubelet capacity from the plugin")
        reply = admit(kubelet_node, "replica", 2, uid=pod.metadata.uid)
        # Best fit alone would choose npu0; the operator's annotation wins through the kubelet's own logic.
        assert devices_of(reply) == {"npu1"}
        assert reply["envs"][contract.ENV_SHARE_GROUP] == "llama-abc"
        assert reply["mounts"] == [
            {
                "container_path": contract.SOCKET_DIR_IN_CONTAINER,
                "host_path": str(dirs.share_root / "llama-abc"),
                "read_only": False,
            }
        ]
        assert kubelet_node.call("plugin_stop")["code"] == 0
    finally:
        core.delete_node(node_name)
